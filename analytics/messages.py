"""The ``error`` string of every JSON error response, shared by the code that answers it and the OpenAPI document."""

from werkzeug.exceptions import MethodNotAllowed, NotFound, TooManyRequests


def http_error_message(name: str) -> str:
    """A werkzeug error's name as the ``error`` field reads it: "Method Not Allowed" becomes "Method not allowed"."""
    return name.capitalize()


INVALID_JSON = "Invalid JSON"
INVALID_EVENTS = "Invalid events"
INVALID_TIMESTAMP = "Invalid timestamp"
ORIGIN_NOT_ALLOWED = "Origin not allowed"
NOT_FOUND = http_error_message(NotFound().name)
METHOD_NOT_ALLOWED = http_error_message(MethodNotAllowed().name)
REQUEST_TIMEOUT = "Request timeout"
PAYLOAD_TOO_LARGE = "Payload too large"
TOO_MANY_EVENTS = "Too many events"
TOO_MANY_CONTAINERS = "Too many objects and arrays"
UNSUPPORTED_ENCODING = "Unsupported Content-Encoding"
TOO_MANY_REQUESTS = http_error_message(TooManyRequests().name)
LOG_WRITE_FAILED = "Failed to process events"
EVENT_STORE_UNAVAILABLE = "Event store unavailable"
INTERNAL_ERROR = "Internal server error"
NOT_READY = "Not ready"
