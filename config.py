"""Every setting of the service and its default.

Deploy-time overrides come from ``ANALYTICS_*`` environment variables (values
are parsed as JSON where they can be, so ``ANALYTICS_MAX_EVENTS=500`` is an int).
The README's settings table describes each one.
"""

import ipaddress
import re
from collections.abc import Iterable

PREFIX = "ANALYTICS_"
# What a browser puts in Origin: scheme, host and port only; "https://shop.example/" never matches one.
ORIGIN_PATTERN = re.compile(r"https?://[^/\s]+")


class SettingsError(ValueError):
    """A setting that cannot be used; the message names it and its value, on one line."""


class Config:
    """Defaults, loaded with ``app.config.from_object``."""

    # Largest body, in bytes, on the wire and again after gzip decompression.
    MAX_BODY_BYTES = 1024 * 1024
    # Most events one batch may hold; more is a 413.
    MAX_EVENTS = 1000
    # Largest event, as compact JSON; a larger one is rejected on its own.
    MAX_EVENT_BYTES = 32 * 1024
    # Secret words: a payload key, at any depth, is secret when some of its consecutive
    # words (split at case changes, digits and punctuation) spell one, maybe plus "s".
    # "newPassword", "x-api-key", "creditCardNumber", "tokens" are; "tokenizer" is not.
    # Its value becomes "[REDACTED]". analytics/redact.py has the whole rule.
    REDACT_KEYS = [
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "secret",
        "token",
        "api key",
        "authorization",
        "cookie",
        "credential",
        "credit card",
        "card number",
        "cvv",
        "cvc",
        "ssn",
        "social security number",
        "private key",
    ]
    # Secret words added to REDACT_KEYS, which keeps its defaults.
    REDACT_KEYS_EXTRA: list[str] = []
    # Redact payloads at all; false writes secrets in clear (and the start says so).
    REDACT_PAYLOADS = True
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
            raise SettingsError(f"{name} must be a positive integer, not {value!r}")
    for name in ("LOG_WRITE_TIMEOUT", "BODY_READ_TIMEOUT"):
        value = settings[name]
        if type(value) not in (int, float) or value <= 0:
            raise SettingsError(f"{name} must be a positive number of seconds, not {value!r}")
    for name in ("LOG_CLIENT_IP", "REDACT_PAYLOADS"):
        if type(settings[name]) is not bool:
            raise SettingsError(f"{name} must be true or false, not {settings[name]!r}")
    for name in ("REDACT_KEYS", "REDACT_KEYS_EXTRA", "TRUSTED_PROXIES", "CORS_ORIGINS"):
        value = settings[name]
        if name == "CORS_ORIGINS" and value == "*":
            continue
        if isinstance(value, str):
            value = settings[name] = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
            raise SettingsError(f"{name} must be a list of strings (a JSON array, or comma-separated), not {value!r}")
    if not settings["REDACT_KEYS"]:
        raise SettingsError("REDACT_KEYS must name at least one secret word (REDACT_PAYLOADS=false turns it off)")
    for name in ("REDACT_KEYS", "REDACT_KEYS_EXTRA"):
        for entry in settings[name]:
            # Without a letter or a digit an entry would match nothing a key is made of.
            if not any(char.isalnum() for char in entry):
                raise SettingsError(f"{name}: {entry!r} is not a word (it has no letter or digit)")
    for entry in settings["TRUSTED_PROXIES"]:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise SettingsError(f"TRUSTED_PROXIES: {entry!r} is not an address or a CIDR network") from None
    if settings["CORS_ORIGINS"] != "*":
        for origin in settings["CORS_ORIGINS"]:
            if not ORIGIN_PATTERN.fullmatch(origin):
                raise SettingsError(
                    f"CORS_ORIGINS: {origin!r} is not an origin (scheme://host[:port], no path, no trailing slash)"
                )


def unknown_variables(environ: Iterable[str]) -> list[str]:
    """The ANALYTICS_* variables that name no setting: a misspelled one would otherwise be ignored silently."""
    known = {PREFIX + name for name in vars(Config) if name.isupper()}
    return sorted(name for name in environ if name.startswith(PREFIX) and name not in known)
