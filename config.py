"""Every setting of the service and its default.

Deploy-time overrides come from ``ANALYTICS_*`` environment variables (values
are parsed as JSON where they can be, so ``ANALYTICS_MAX_EVENTS=500`` is an int).
The README's settings table describes each one.
"""

import ipaddress
import re
from collections.abc import Iterable

# Environment variables named ANALYTICS_<SETTING> override the defaults (app.load_config).
PREFIX = "ANALYTICS"
# What a browser puts in Origin: scheme, host and port only; "https://shop.example/" never matches one.
ORIGIN_PATTERN = re.compile(r"https?://[^/\s]+", re.IGNORECASE)
# A NATS server URL: nats://[user[:password]@]host:port, the host a name, an IPv4 or a bracketed IPv6 address.
NATS_URL_PATTERN = re.compile(r"nats://(?:[^\s/@]+@)?(?:\[[0-9A-Fa-f:.]+\]|[^\s/:@\[\]]+):\d{1,5}")
# A JetStream stream name: no spaces, dots, wildcards or path separators.
STREAM_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,255}")
# A literal NATS subject (events go to one subject, so no wildcard): tokens separated by dots.
SUBJECT_PATTERN = re.compile(r"[^\s.*>]+(?:\.[^\s.*>]+)*")
SINK_NAMES = ("stdout", "nats")
# The range of every setting in seconds.
MIN_SECONDS = 0.001
MAX_SECONDS = 86400


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
    # Where accepted events go: "stdout" (one line each), "nats" (a JetStream stream), or both.
    # A batch is answered 200 once every sink has taken it; with both, NATS is written first.
    SINKS = ["stdout"]
    # The NATS servers the nats sink connects to: any of a cluster's nodes will do.
    NATS_SERVERS = ["nats://127.0.0.1:4222"]
    # The JetStream stream events are stored in; created if missing, else used as it is.
    NATS_STREAM = "ANALYTICS"
    # The subject each event is published on; the stream's subjects must cover it.
    NATS_SUBJECT = "analytics.events"
    # Replicas of a stream the service creates (1 to 5; 3 on a three-node cluster).
    NATS_REPLICAS = 1
    # Seconds a created stream remembers event ids, so a retried batch adds no copy.
    NATS_DUPLICATE_WINDOW = 120.0
    # Seconds to wait for a batch's JetStream acknowledgements before answering 503.
    NATS_ACK_TIMEOUT = 2.0


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
    for name in ("LOG_WRITE_TIMEOUT", "BODY_READ_TIMEOUT", "NATS_DUPLICATE_WINDOW", "NATS_ACK_TIMEOUT"):
        value = settings[name]
        # NaN, infinity and 1e308 parse as JSON numbers; a socket timeout under a millisecond is none at all.
        if type(value) not in (int, float) or not MIN_SECONDS <= value <= MAX_SECONDS:
            raise SettingsError(
                f"{name} must be a number of seconds from {MIN_SECONDS} to {MAX_SECONDS}, not {value!r}"
            )
    for name in ("LOG_CLIENT_IP", "REDACT_PAYLOADS"):
        if type(settings[name]) is not bool:
            raise SettingsError(f"{name} must be true or false, not {settings[name]!r}")
    for name in ("REDACT_KEYS", "REDACT_KEYS_EXTRA", "TRUSTED_PROXIES", "CORS_ORIGINS", "SINKS", "NATS_SERVERS"):
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
        settings["CORS_ORIGINS"] = [browser_origin(origin) for origin in settings["CORS_ORIGINS"]]
    check_nats_settings(settings)


def check_nats_settings(settings: dict) -> None:
    """SINKS and the NATS_* settings (their types already checked): checked whatever SINKS holds."""
    sinks = settings["SINKS"]
    unknown = [sink for sink in sinks if sink not in SINK_NAMES]
    if not sinks or unknown or len(set(sinks)) != len(sinks):
        raise SettingsError(f"SINKS must be one or both of {', '.join(SINK_NAMES)}, each once, not {sinks!r}")
    if not settings["NATS_SERVERS"]:
        raise SettingsError("NATS_SERVERS must name at least one server (nats://host:port)")
    for url in settings["NATS_SERVERS"]:
        if not NATS_URL_PATTERN.fullmatch(url):
            raise SettingsError(f"NATS_SERVERS: {url!r} is not a NATS server URL (nats://host:port)")
    for name, pattern, what in (
        ("NATS_STREAM", STREAM_NAME_PATTERN, "a stream name (letters, digits, - and _)"),
        ("NATS_SUBJECT", SUBJECT_PATTERN, "a subject (dot-separated tokens, no wildcard or space)"),
    ):
        value = settings[name]
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise SettingsError(f"{name} must be {what}, not {value!r}")
    replicas = settings["NATS_REPLICAS"]
    if type(replicas) is not int or not 1 <= replicas <= 5:
        raise SettingsError(f"NATS_REPLICAS must be an integer from 1 to 5 (JetStream's most), not {replicas!r}")


def browser_origin(origin: str) -> str:
    """``origin`` as a browser writes it in Origin: lower case, without the scheme's default port.

    Otherwise "https://Shop.Example" or "https://shop.example:443" would pass the check
    above and then never match, refusing every browser without a word.
    """
    origin = origin.lower()
    for scheme, port in (("https://", ":443"), ("http://", ":80")):
        if origin.startswith(scheme):
            origin = origin.removesuffix(port)
    return origin


def unknown_variables(environ: Iterable[str]) -> list[str]:
    """The ANALYTICS_* variables that name no setting: a misspelled one would otherwise be ignored silently."""
    known = {f"{PREFIX}_{name}" for name in vars(Config) if name.isupper()}
    return sorted(name for name in environ if name.startswith(f"{PREFIX}_") and name not in known)
