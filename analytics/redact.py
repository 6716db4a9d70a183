"""Masking of secret-named payload keys before anything is written.

A key is split into words: at case changes ("newPassword"; "APIKey" is "API"
and "Key"), between letters and digits, and at anything that is neither
("x-api-key", "user.password", "api key"). A key is secret when a run of its
consecutive words, joined and lower-cased, is one of the secret words, or one
of them plus "s". The secret words are the REDACT_KEYS entries (and
REDACT_KEYS_EXTRA's), lower-cased, with everything but letters and digits
taken out: "credit card" is "creditcard". So "passWord", "creditCardNumber"
and "tokens" are secret, and "tokenizer", "classname" and "author" are not: a
secret word is whole words of the key, never part of one.

Keys come from clients and may be a MiB long, so the words are never listed.
A run of words spells a secret word exactly when the secret word's letters
appear in the key in order with only separators between them, the first at a
word's start and the last at a word's end; one regular expression looks for
that, testing where a word starts or ends only around a candidate's first and
last letters. From each candidate it follows the secret words' letters (as a
tree), so no character is looked at more times than the longest secret word
has letters: the cost is linear in the key's length.
"""

import gc
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import structlog

log = structlog.get_logger()

REDACTED = "[REDACTED]"

# Keys up to this long have their answer kept: payloads repeat the same few short keys in
# every event. At most CACHED_KEYS are kept (then the table starts afresh), so whatever
# clients send, it holds at most CACHED_KEYS keys of CACHED_KEY_CHARS characters.
CACHED_KEY_CHARS = 64
CACHED_KEYS = 4096
# Characters of keys not kept above that one request may have checked. Checking costs up to
# 300 ns a character (the expression below, on keys made to be slow), 20 times what a valid
# batch costs a byte: unchecked, 1 MiB of such keys cost 300 ms. Past this budget the values
# of further unknown keys are redacted unchecked: a request that needs more (64 Ki characters
# of keys never seen before) is made to, and is told about in a diagnostic line.
KEY_CHARS_PER_REQUEST = 64 * 1024


def _char_class(chars: Iterable[str]) -> str:
    """The inside of a regular-expression character set holding ``chars``, as ranges."""
    points = sorted(map(ord, chars))
    ranges = []
    start = end = points[0]
    for point in points[1:]:
        if point != end + 1:
            ranges.append((start, end))
            start = point
        end = point
    ranges.append((start, end))
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


def _case_tables() -> tuple[str, dict[str, list[str]]]:
    """The upper-case letters as a character set, and for each lower-case letter the letters lowering to it.

    Python's re has no class for upper-case letters, hence the scan, once. Only the
    Basic Multilingual Plane is read: a set reaching past it is no longer compiled to
    a table but to a list of ranges, tried one by one for every character tested,
    which made long keys several times slower. Beyond it (Deseret, Adlam, mathematical
    letters) letters count as caseless.
    """
    upper, lowering_to = [], defaultdict(list)
    for char in map(chr, range(0x10000)):
        if char.isupper() or char.istitle():
            upper.append(char)
        lower = char.lower()
        if lower != char and len(lower) == 1:
            lowering_to[lower].append(char)
    return _char_class(upper), lowering_to


UPPER, LOWERING_TO = _case_tables()
LETTER = r"[^\W\d_]"
# Between two letters of a secret word: anything but letters and digits.
SEPARATORS = r"[\W_]*+"
# Where a word starts, tested just after the candidate's first character (so the
# lookbehinds see the one before it and the first), by the kind of that character.
# A lower-case or caseless letter starts a word unless a letter comes before it.
STARTS_AFTER_LOWER = rf"(?<!{LETTER}.)"
# An upper-case one, unless an upper-case letter comes before it and no lower-case
# or caseless letter after it ("APIKey": "K" starts "Key", "I" starts nothing).
STARTS_AFTER_UPPER = rf"(?:(?<![{UPPER}].)|(?=(?![{UPPER}]){LETTER}))"
# A digit, unless a digit comes before it.
STARTS_AFTER_DIGIT = r"(?<!\d.)"
# Where a word ends, tested after the candidate's last character: before a separator or
# the end, between a digit and a letter, before an upper-case letter that follows
# another letter, or before the capital of a word that follows an acronym.
ENDS = (
    rf"(?:(?![^\W_])|(?<=\d)(?={LETTER})|(?<={LETTER})(?=\d)"
    rf"|(?<![{UPPER}])(?=[{UPPER}])|(?<=[{UPPER}])(?=[{UPPER}](?![{UPPER}]){LETTER}))"
)
# A secret word may take a plural "s", as a word of its own or not.
PLURAL = rf"(?:{SEPARATORS}[sS])?"


def secret_word(entry: str) -> str:
    """A REDACT_KEYS entry as it is matched: lower-cased, with nothing but letters and digits."""
    return re.sub(r"[\W_]+", "", entry.lower())


def _spellings(char: str) -> list[str]:
    """The characters a key may have where a secret word has ``char``: those lower-casing to it."""
    return [char, *LOWERING_TO.get(char, [])]


def _word_start(char: str) -> str:
    """The test that ``char``, just matched, starts a word."""
    if char.isdecimal():
        return STARTS_AFTER_DIGIT
    if re.fullmatch(f"[{UPPER}]", char):
        return STARTS_AFTER_UPPER
    return STARTS_AFTER_LOWER


def _one_of(chars: Iterable[str]) -> str:
    """A character set matching any of ``chars``."""
    return f"[{''.join(map(re.escape, chars))}]"


def _rest(trie: dict[str, Any]) -> str:
    """The pattern for the remaining letters of the secret words in ``trie`` (a letter tree), and a plural "s"."""
    branches = [SEPARATORS + _one_of(_spellings(char)) + _rest(child) for char, child in sorted(trie.items()) if char]
    if "" in trie:
        branches.append(PLURAL)
    return branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"


def secret_pattern(secrets: Iterable[str]) -> re.Pattern[str]:
    """The expression that finds a run of words spelling one of ``secrets`` (as secret_word made them).

    It starts with one set of every character a secret word can start with, so that
    the search skips at C speed to where one is; then checks that a word starts
    there, and follows the letters of the secret words starting with that character,
    those shared by several secret words once (the branches form a tree); then checks
    that a word ends there. The upper-case set is large: it appears in those two
    checks only, not once per secret word (a worker held 13 MiB of copies when it did).
    """
    trie: dict[str, Any] = {}
    for secret in secrets:
        node = trie
        for char in secret:
            node = node.setdefault(char, {})
        node[""] = {}
    first = [spelling for char in trie for spelling in _spellings(char)]
    starts: dict[str, list[str]] = defaultdict(list)
    for spelling in first:
        starts[_word_start(spelling)].append(spelling)
    starts_word = "|".join(f"(?<={_one_of(chars)}){check}" for check, chars in starts.items())
    letters = "|".join(f"(?<={_one_of(_spellings(char))}){_rest(child)}" for char, child in sorted(trie.items()))
    return re.compile(f"{_one_of(first)}(?:{starts_word})(?:{letters}){ENDS}")


class Redactor:
    """Replaces the values of secret-named keys in payloads, for one set of secret words."""

    def __init__(self, entries: Iterable[str]) -> None:
        secrets = {secret_word(entry) for entry in entries}
        if not secrets or not all(secrets):
            raise ValueError("every secret word needs a letter or a digit")
        self._secret_run = secret_pattern(secrets)
        self._known: dict[str, bool] = {}
        # The keys of _known that are not secret: a dict whose keys all are is passed over with one set comparison.
        self._safe: set[str] = set()

    def is_secret(self, key: str) -> bool:
        """Whether ``key`` names a secret, worked out afresh."""
        return self._secret_run.search(key) is not None

    def for_request(self) -> Callable[[Iterable[Any]], int]:
        """A function that redacts, in place and at any depth, the payloads of one request.

        Keys it has not seen are checked within the request's KEY_CHARS_PER_REQUEST.
        """
        known = self._known
        safe = self._safe
        budget = KEY_CHARS_PER_REQUEST

        def is_secret(key: str) -> bool:
            nonlocal budget
            answer = known.get(key)
            if answer is None:
                budget -= len(key)
                if budget < 0:
                    if budget + len(key) >= 0:
                        log.warning("redaction_budget_spent", unchecked="values of further new keys are redacted")
                    return True
                answer = self.is_secret(key)
                if len(key) <= CACHED_KEY_CHARS:
                    if len(known) >= CACHED_KEYS:
                        known.clear()
                        safe.clear()
                    known[key] = answer
                    if not answer:
                        safe.add(key)
            return answer

        def redact(payloads: Iterable[Any]) -> int:
            """Redact ``payloads`` in place; return how many values were replaced."""
            replaced = 0
            # A level at a time, all payloads together: gc.get_referents lists every child of a
            # level in one call, so an array costs a step of a comprehension, not a Python call
            # (half the time, on bodies of 1000 events of 250 nested arrays each).
            containers = [value for value in payloads if type(value) is dict or type(value) is list]
            while containers:
                for value in containers:
                    if type(value) is dict and not value.keys() <= safe:
                        for key in value:
                            if is_secret(key):
                                value[key] = REDACTED
                                replaced += 1
                containers = [
                    child
                    for child in gc.get_referents(*containers)
                    if (type(child) is dict or type(child) is list) and child
                ]
            return replaced

        return redact

    def redact(self, value: Any) -> None:
        """Redact one payload, as a request of its own."""
        self.for_request()([value])


def redactor_from_settings(settings: Mapping[str, Any]) -> Redactor | None:
    """The Redactor for REDACT_KEYS and REDACT_KEYS_EXTRA, or None (with a warning) if REDACT_PAYLOADS is off."""
    if not settings["REDACT_PAYLOADS"]:
        log.warning("redaction_off", setting="REDACT_PAYLOADS", effect="payload values are written as sent")
        return None
    return Redactor([*settings["REDACT_KEYS"], *settings["REDACT_KEYS_EXTRA"]])
