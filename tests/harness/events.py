"""Events made to a purpose: the longest context a trusted proxy may pass on, events that grow the most from the
bytes sent to the bytes written, and a realistic page view."""

import uuid
from typing import Any

# The longest X-Request-ID and X-Forwarded-For address the service takes from a trusted proxy.
LONGEST_REQUEST_ID = "r" * 128
LONGEST_ADDRESS = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"

# Events that grow the most from the bytes sent to the bytes written: raw U+0085 (2 bytes) is
# written as \u0085 (6), U+2028 (3) as \u2028 (6), 1e15 (4) as 1000000000000000.0 (18), and a
# numeric timestamp as an RFC 3339 string. (prefix, unit, separator, suffix) of each.
EXPANDING = {
    "next_line": (b'{"type":"a","timestamp":0.5,"payload":{"s":"', "\x85".encode(), b"", b'"}}'),
    "line_separator": (b'{"type":"a","timestamp":0.5,"payload":{"s":"', "\u2028".encode(), b"", b'"}}'),
    "exponents": (b'{"type":"a","timestamp":0.5,"payload":{"n":[', b"1e15", b",", b"]}}"),
}


def expanding_event(name: str, sent_bytes: int) -> bytes:
    """An event of kind ``name`` (one of EXPANDING) that is about ``sent_bytes`` long as sent."""
    prefix, unit, separator, suffix = EXPANDING[name]
    count = max(1, (sent_bytes - len(prefix) - len(suffix)) // (len(unit) + len(separator)))
    return prefix + separator.join([unit] * count) + suffix


def realistic_event(number: int) -> dict[str, Any]:
    """A page view of about 700 bytes, as a shop's pages send them."""
    return {
        "type": "page_view",
        "payload": {
            "url": f"https://shop.example/products/{number}?utm_source=newsletter&utm_medium=email",
            "referrer": "https://www.example.org/search?q=books",
            "title": f"Product {number} - The Shop",
            "screen": "1920x1080",
            "items": [{"sku": f"BOOK-{item}", "price": 19.5, "quantity": 1} for item in range(8)],
        },
        "userId": f"user-{number}",
        "sessionId": str(uuid.uuid4()),
        "id": str(uuid.uuid4()),
        "timestamp": "2024-05-20T14:32:00.123Z",
    }
