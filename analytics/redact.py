"""Masking of secret-looking payload keys before anything is written."""

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

REDACTED = "[REDACTED]"


@lru_cache(maxsize=4096)
def normalize_key(key: str) -> str:
    """The form keys are compared in: "Access-Token" and "accessToken" both become "accesstoken".

    Cached: payloads repeat the same few keys in every event.
    """
    return key.lower().replace("_", "").replace("-", "")


def redacted_key_set(keys: Iterable[str]) -> frozenset[str]:
    """The REDACT_KEYS setting in the form ``redact`` compares against."""
    return frozenset(normalize_key(key) for key in keys)


def redact(value: Any, keys: frozenset[str]) -> None:
    """Replace, in place and at any depth, the value of every dict key in ``keys``."""
    if type(value) is dict:
        for key, item in value.items():
            if normalize_key(key) in keys:
                value[key] = REDACTED
            elif type(item) is dict or type(item) is list:
                redact(item, keys)
    elif type(value) is list:
        for item in value:
            if type(item) is dict or type(item) is list:
                redact(item, keys)
