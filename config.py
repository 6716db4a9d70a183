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
