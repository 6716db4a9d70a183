"""Every setting of the service and its default.

Deploy-time overrides come from ``ANALYTICS_*`` environment variables (values
are parsed as JSON where they can be, so ``ANALYTICS_MAX_EVENTS=500`` is an int).
The README's settings table describes each one.
"""


class Config:
    """Defaults, loaded with ``app.config.from_object``."""

    # Largest body, in bytes, on the wire and again after gzip decompression.
    MAX_BODY_BYTES = 1024 * 1024
    # Most events one batch may hold; more is a 413.
    MAX_EVENTS = 1000
    # Largest event, as compact JSON; a larger one is rejected on its own.
    MAX_EVENT_BYTES = 32 * 1024
    # Payload keys whose values become "[REDACTED]", at any depth. Matched
    # ignoring case, "_" and "-", so "accessToken" and "ACCESS-TOKEN" match too.
    REDACT_KEYS = [
        "password",
        "passwd",
        "secret",
        "token",
        "api_key",
        "apikey",
        "authorization",
        "access_token",
        "refresh_token",
        "credit_card",
        "card_number",
        "cvv",
        "ssn",
    ]
    # Origins allowed to call the API from a browser: "*" or a list of origins.
    CORS_ORIGINS = "*"
    # Peers (addresses or CIDR networks) whose X-Forwarded-For and X-Request-ID
    # are believed. Everyone else's are ignored.
    TRUSTED_PROXIES = ["127.0.0.1", "::1"]
    # Seconds the body may stop arriving before the request is a 408 (per read,
    # like nginx's client_body_timeout); behind nginx, which buffers bodies, it never fires.
    BODY_READ_TIMEOUT = 10.0
    # Seconds to wait for stdout to accept a batch before answering 500.
    LOG_WRITE_TIMEOUT = 5.0
    # Put the client's address on each event line.
    LOG_CLIENT_IP = True


def check_settings(settings: dict) -> None:
    """Check every setting's type, in place, so that a mistyped environment variable stops the start.

    ``from_prefixed_env`` keeps a value that is not JSON as a string: a list
    setting written ``password,token`` would otherwise be taken letter by
    letter, and redaction would silently stop. Such lists are split on commas.
    """
    for name in ("MAX_BODY_BYTES", "MAX_EVENTS", "MAX_EVENT_BYTES"):
        value = settings[name]
        if type(value) is not int or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")
    for name in ("LOG_WRITE_TIMEOUT", "BODY_READ_TIMEOUT"):
        value = settings[name]
        if type(value) not in (int, float) or value <= 0:
            raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    if type(settings["LOG_CLIENT_IP"]) is not bool:
        raise ValueError(f"LOG_CLIENT_IP must be true or false, not {settings['LOG_CLIENT_IP']!r}")
    for name in ("REDACT_KEYS", "TRUSTED_PROXIES", "CORS_ORIGINS"):
        value = settings[name]
        if name == "CORS_ORIGINS" and value == "*":
            continue
        if isinstance(value, str):
            value = settings[name] = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"{name} must be a list of strings (a JSON array, or comma-separated), not {value!r}")
