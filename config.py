"""Every setting of the service and its default.

Deploy-time overrides come from ``ANALYTICS_*`` environment variables (values
are parsed as JSON where they can be, so ``ANALYTICS_MAX_EVENTS=500`` is an int).
The README's settings table describes each one.
"""

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

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
SINK_NAMES = ("stdout", "nats", "kafka")
# A Kafka bootstrap server: host:port, the host a name, an IPv4 or a bracketed IPv6 address.
KAFKA_SERVER_PATTERN = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[^\s/:@,\[\]]+):\d{1,5}")
# A Kafka topic name, as Kafka allows it ("." and ".." excepted, below).
TOPIC_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,249}")
# librdkafka settings KAFKA_CONFIG may not hold: the service sets them (the delivery guarantee, the bound on a
# request, where to connect, the statistics readiness is read from), or they would need calls it never makes.
KAFKA_RESERVED_KEYS = (
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "bootstrap.servers",
    "metadata.broker.list",
    "statistics.interval.ms",
    "transactional.id",
)
# The database part of a redis URL: none, or /N.
REDIS_DB_PATTERN = re.compile(r"(?:/\d*)?")
# What CLIENT_IP may be, and the shortest VISITOR_ID_SECRET: 32 characters of secrets.token_urlsafe are 192 bits.
CLIENT_IP_MODES = ("anonymized", "full", "none")
MIN_SECRET_CHARS = 32
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
    # The client's address on each event line: "anonymized" (IPv4 to its /24, IPv6 to its /48), "full" or "none".
    CLIENT_IP = "anonymized"
    # With a secret (32 characters or more), each line carries visitor_id, a keyed hash rotating daily.
    VISITOR_ID_SECRET = ""
    # Parse the User-Agent header into each line's ua field (about 27 MiB more per worker).
    PARSE_USER_AGENT = False
    # Events from bots (crawlers, headless browsers): "keep" (flagged bot: true), "drop" (answered, not written),
    # or "off" (not looked for: no bot field).
    BOTS = "keep"
    # Addresses or CIDR networks (the site owner's office) whose events are answered as usual and not written.
    EXCLUDE_IPS: list[str] = []
    # Give each event with a timestamp, in a batch with one, a derived_timestamp corrected for the client's clock.
    DERIVED_TIMESTAMP = True
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
    # The Kafka brokers the kafka sink first connects to (host:port); it learns the others from them.
    KAFKA_BOOTSTRAP_SERVERS = ["127.0.0.1:9092"]
    # The topic each event is one record on.
    KAFKA_TOPIC = "analytics-events"
    # Further librdkafka settings (security.protocol, sasl.*, ...), a JSON object; docs/kafka.md.
    KAFKA_CONFIG: dict = {}
    # Seconds to wait for a batch's Kafka delivery reports (librdkafka's message.timeout.ms) before answering 503.
    KAFKA_ACK_TIMEOUT = 2.0
    # Count requests and events for Prometheus (GET /metrics); false costs nothing per request.
    METRICS = True
    # Clients (addresses or CIDR networks, as resolved through TRUSTED_PROXIES) that may read /metrics.
    METRICS_ALLOW = ["127.0.0.0/8", "::1"]
    # Most POSTs to /api/analytics one client address may make, such as "600/minute"; None: no limit.
    # For platforms without nginx in front (nginx's limit_req does this there): docs/operating.md.
    RATE_LIMIT: str | None = None
    # Where the counts live: "memory://" (each worker counts alone) or "redis://host:port/db" (shared by all).
    RATE_LIMIT_STORAGE = "memory://"
    # A JSON file mapping each event type to the JSON Schema (draft 2020-12) of its payload: docs/tracking-plan.md.
    TRACKING_PLAN: str | None = None
    # What a payload that violates its type's schema gets: "off", "flag" or "reject"; None: flag with a plan.
    TRACKING_PLAN_MODE: str | None = None
    # What an event whose type is not in the plan gets: "allow", "flag" or "reject".
    TRACKING_PLAN_UNPLANNED = "flag"


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
    for name in (
        "LOG_WRITE_TIMEOUT",
        "BODY_READ_TIMEOUT",
        "NATS_DUPLICATE_WINDOW",
        "NATS_ACK_TIMEOUT",
        "KAFKA_ACK_TIMEOUT",
    ):
        value = settings[name]
        # NaN, infinity and 1e308 parse as JSON numbers; a socket timeout under a millisecond is none at all.
        if type(value) not in (int, float) or not MIN_SECONDS <= value <= MAX_SECONDS:
            raise SettingsError(
                f"{name} must be a number of seconds from {MIN_SECONDS} to {MAX_SECONDS}, not {value!r}"
            )
    for name in ("REDACT_PAYLOADS", "METRICS", "PARSE_USER_AGENT", "DERIVED_TIMESTAMP"):
        if type(settings[name]) is not bool:
            raise SettingsError(f"{name} must be true or false, not {settings[name]!r}")
    for name in (
        "REDACT_KEYS",
        "REDACT_KEYS_EXTRA",
        "TRUSTED_PROXIES",
        "CORS_ORIGINS",
        "SINKS",
        "NATS_SERVERS",
        "KAFKA_BOOTSTRAP_SERVERS",
        "METRICS_ALLOW",
        "EXCLUDE_IPS",
    ):
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
    for name in ("TRUSTED_PROXIES", "METRICS_ALLOW", "EXCLUDE_IPS"):
        for entry in settings[name]:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise SettingsError(f"{name}: {entry!r} is not an address or a CIDR network") from None
    if settings["CORS_ORIGINS"] != "*":
        for origin in settings["CORS_ORIGINS"]:
            if not ORIGIN_PATTERN.fullmatch(origin):
                raise SettingsError(
                    f"CORS_ORIGINS: {origin!r} is not an origin (scheme://host[:port], no path, no trailing slash)"
                )
        settings["CORS_ORIGINS"] = [browser_origin(origin) for origin in settings["CORS_ORIGINS"]]
    check_nats_settings(settings)
    check_kafka_settings(settings)
    check_metrics_settings(settings)
    check_rate_limit_settings(settings)
    check_tracking_plan_settings(settings)
    check_enrichment_settings(settings)


def check_nats_settings(settings: dict) -> None:
    """SINKS and the NATS_* settings (their types already checked): checked whatever SINKS holds."""
    sinks = settings["SINKS"]
    unknown = [sink for sink in sinks if sink not in SINK_NAMES]
    if not sinks or unknown or len(set(sinks)) != len(sinks):
        raise SettingsError(f"SINKS must be one or more of {', '.join(SINK_NAMES)}, each once, not {sinks!r}")
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


def check_rate_limit_settings(settings: dict) -> None:
    """RATE_LIMIT and RATE_LIMIT_STORAGE: checked whatever RATE_LIMIT holds, like the NATS settings."""
    rate = settings["RATE_LIMIT"]
    if rate is not None:
        # Imported only for a limit: without one the service never loads the rate-limiting libraries.
        from limits import parse_many

        try:
            items = parse_many(rate) if isinstance(rate, str) else None
        except ValueError:
            items = None
        if not items or any(item.amount < 1 for item in items):
            raise SettingsError(
                f"RATE_LIMIT must be a rate such as 600/minute (or several: 10/second;600/hour), "
                f"or null for no limit, not {rate!r}"
            )
    storage = settings["RATE_LIMIT_STORAGE"]
    if not isinstance(storage, str) or not storage_url_ok(storage):
        shown = hide_password(storage) if isinstance(storage, str) else repr(storage)
        raise SettingsError(
            f"RATE_LIMIT_STORAGE must be memory:// or a redis URL (redis://host:port/db, rediss://..., "
            f"redis+unix:///path/to/socket), not {shown}"
        )


def storage_url_ok(url: str) -> bool:
    """Whether ``url`` is memory:// or a redis URL redis-py can use."""
    if url == "memory://":
        return True
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        return False
    if parts.scheme in ("redis", "rediss"):
        return bool(parts.hostname) and port != 0 and REDIS_DB_PATTERN.fullmatch(parts.path) is not None
    return parts.scheme == "redis+unix" and not parts.netloc and len(parts.path) > 1


def hide_password(url: str) -> str:
    """``url`` quoted, its password (if any) replaced by ***: a refused setting is written to the logs."""
    parts = urlsplit(url)
    if parts.password:
        url = url.replace(f":{parts.password}@", ":***@", 1)
    return repr(url)


def check_metrics_settings(settings: dict) -> None:
    """METRICS_ALLOW (its type and entries already checked): at least one network."""
    if not settings["METRICS_ALLOW"]:
        raise SettingsError("METRICS_ALLOW must name at least one network (METRICS=false turns metrics off)")


def check_tracking_plan_settings(settings: dict) -> None:
    """TRACKING_PLAN and its modes; TRACKING_PLAN_MODE unset becomes flag with a plan and off without.

    The file itself is read and its schemas checked when the app is built (analytics.plan).
    """
    plan = settings["TRACKING_PLAN"]
    if plan is not None and not isinstance(plan, str):
        raise SettingsError(f"TRACKING_PLAN must be the path of a JSON file, not {plan!r}")
    mode = settings["TRACKING_PLAN_MODE"]
    if mode is None:
        mode = settings["TRACKING_PLAN_MODE"] = "flag" if plan else "off"
    if mode not in ("off", "flag", "reject"):
        raise SettingsError(f"TRACKING_PLAN_MODE must be off, flag or reject, not {mode!r}")
    if mode != "off" and not plan:
        raise SettingsError(f"TRACKING_PLAN_MODE is {mode} but TRACKING_PLAN names no plan file")
    unplanned = settings["TRACKING_PLAN_UNPLANNED"]
    if unplanned not in ("allow", "flag", "reject"):
        raise SettingsError(f"TRACKING_PLAN_UNPLANNED must be allow, flag or reject, not {unplanned!r}")


def check_kafka_settings(settings: dict) -> None:
    """The KAFKA_* settings (the servers' and the timeout's types already checked): checked whatever SINKS holds.

    KAFKA_CONFIG's values are never put in an error: it holds passwords. librdkafka checks
    its names and values when the app is built with the kafka sink (analytics.kafka).
    """
    servers = settings["KAFKA_BOOTSTRAP_SERVERS"]
    if not servers:
        raise SettingsError(f"KAFKA_BOOTSTRAP_SERVERS must name at least one broker (host:port), not {servers!r}")
    for server in servers:
        if not KAFKA_SERVER_PATTERN.fullmatch(server):
            raise SettingsError(f"KAFKA_BOOTSTRAP_SERVERS: {server!r} is not a broker address (host:port)")
    topic = settings["KAFKA_TOPIC"]
    if not isinstance(topic, str) or not TOPIC_PATTERN.fullmatch(topic) or topic in (".", ".."):
        raise SettingsError(f"KAFKA_TOPIC must be a topic name (letters, digits, '.', '_' and '-'), not {topic!r}")
    client_config = settings["KAFKA_CONFIG"]
    if not isinstance(client_config, dict):
        raise SettingsError("KAFKA_CONFIG must be a JSON object of librdkafka settings")
    for name, value in client_config.items():
        if name in KAFKA_RESERVED_KEYS:
            raise SettingsError(f"KAFKA_CONFIG may not set {name!r}: the service sets it (docs/kafka.md)")
        if type(value) not in (str, int, float, bool):
            raise SettingsError(f"KAFKA_CONFIG: {name!r} must be a string, a number or true/false")


def check_enrichment_settings(settings: dict) -> None:
    """CLIENT_IP, VISITOR_ID_SECRET and BOTS (the others, EXCLUDE_IPS's entries too, already checked).

    LOG_CLIENT_IP, which CLIENT_IP replaced, stops the start rather than being half obeyed. The
    secret's value is never put in an error: errors are logged.
    """
    if "LOG_CLIENT_IP" in settings:
        raise SettingsError(
            "LOG_CLIENT_IP is no longer read: set CLIENT_IP to anonymized (the default), full or none instead"
        )
    if settings["CLIENT_IP"] not in CLIENT_IP_MODES:
        raise SettingsError(f"CLIENT_IP must be anonymized, full or none, not {settings['CLIENT_IP']!r}")
    secret = settings["VISITOR_ID_SECRET"]
    if not isinstance(secret, str):
        raise SettingsError(
            f"VISITOR_ID_SECRET must be text, not read as {type(secret).__name__}: quote one that reads as JSON "
            "(ANALYTICS_VISITOR_ID_SECRET='\"...\"')"
        )
    if secret and len(secret) < MIN_SECRET_CHARS:
        raise SettingsError(
            f"VISITOR_ID_SECRET must be empty (no visitor_id) or at least {MIN_SECRET_CHARS} characters, "
            f"not {len(secret)} (python3 -c 'import secrets; print(secrets.token_urlsafe(32))' makes one)"
        )
    if settings["BOTS"] not in ("keep", "drop", "off"):
        raise SettingsError(f"BOTS must be keep, drop or off, not {settings['BOTS']!r}")


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
