"""Redaction: which payload keys are secret, at any depth, under each setting, and at what cost for long keys."""

import json
import time
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st

from analytics.redact import CACHED_KEY_CHARS, KEY_CHARS_PER_REQUEST, Redactor, secret_word
from app import create_app
from config import Config
from tests.harness.lines import parse_lines

DEFAULT = Redactor(Config.REDACT_KEYS)

# Keys a user would call secret, each with the default REDACT_KEYS.
SECRET = [
    "password",
    "PASSWORD",
    "passWord",
    "new_password",
    "user.password",
    "user[password]",
    "pass word",
    "passwords",
    "PASSWORDs",
    "pwd",
    "passwd",
    "client_secret",
    "x-api-key",
    "api key",
    "APIKey",
    "myAPIKey",
    "API_KEY",
    "auth_token",
    "accessToken",
    "refresh-token",
    "sessionToken",
    "tokens",
    "Authorization",
    "Set-Cookie",
    "cookies",
    "private_key",
    "privateKey",
    "creditCardNumber",
    "credit_card",
    "Card-Number",
    "cvv",
    "cvv2",
    "CVC",
    "ssn",
    "SSNs",
    "SSNValue",
    "APIKEYHeader",
    "social_security_number",
    "credentials",
    "passphrase",
    "p_a_s_s_w_o_r_d",
]
# Keys that only look like it: a secret word inside a word, or a word of one alone.
NOT_SECRET = [
    "tokenizer",
    "classname",
    "author",
    "passage",
    "secretary",
    "userpassword",
    "XAPIKey",
    "PASSWORDfield",
    "card",
    "number",
    "key",
    "api",
    "credit",
    "sku",
    "price",
    "slug",
    "note",
    "",
]


@pytest.mark.parametrize("key", SECRET)
def test_secret_keys(key):
    """A run of the key's words spells a secret word (or its plural): its value is redacted."""
    payload = {key: "hunter2", "sku": "A-1"}
    DEFAULT.redact(payload)
    assert payload == {key: "[REDACTED]", "sku": "A-1"}


@pytest.mark.parametrize("key", NOT_SECRET)
def test_keys_that_are_not_secret(key):
    """A secret word inside a longer word, or part of one, is not enough: the value stays."""
    payload = {key: "hunter2"}
    DEFAULT.redact(payload)
    assert payload == {key: "hunter2"}


@pytest.mark.parametrize(
    ("entry", "key", "secret"),
    [
        ("2fa", "user_2fa_code", True),
        ("2fa", "my2FA", True),
        ("2fa", "12fa", False),
        ("2fa", "2fax", False),
        ("mp3", "mp3file", True),
        ("mp3", "mp33", False),
        ("contraseña", "nuevaContraseña", True),
        ("contraseña", "CONTRASEÑAS", True),
        ("contraseña", "contraseñaantigua", False),
        ("密码", "用户_密码", True),
        ("密码", "用户密码", False),
    ],
)
def test_secret_words_with_digits_and_other_scripts(entry, key, secret):
    """Digits are words of their own; letters of any script match ignoring case; caseless ones need a separator."""
    assert Redactor([entry]).is_secret(key) is secret


def post_payload(client: FlaskClient, capfd: pytest.CaptureFixture[str], payload: Any) -> Any:
    """Send one event with ``payload``; return the payload of the line written."""
    capfd.readouterr()
    response = client.post("/api/analytics", json={"events": [{"type": "a", "payload": payload}]})
    assert (response.status_code, response.json) == (200, {"success": True, "received": 1})
    (line,) = parse_lines(capfd.readouterr().out.encode())
    return line["payload"]


def test_redaction_at_any_depth_and_in_arrays(client, capfd):
    """Secret keys are found in objects inside arrays inside objects, however deep; other values stay as sent."""
    payload = {
        "user": {"name": "ann", "newPassword": "p", "cards": [{"cardNumber": "4111", "last4": "1111"}, [{"cvv": 1}]]},
        "items": [[[{"sku": "A", "apiKey": "k"}]]],
        "deep": {"a": {"b": {"c": {"sessionToken": {"not": "kept"}}}}},
        "note": "password",
    }
    assert post_payload(client, capfd, payload) == {
        "user": {
            "name": "ann",
            "newPassword": "[REDACTED]",
            "cards": [{"cardNumber": "[REDACTED]", "last4": "1111"}, [{"cvv": "[REDACTED]"}]],
        },
        "items": [[[{"sku": "A", "apiKey": "[REDACTED]"}]]],
        "deep": {"a": {"b": {"c": {"sessionToken": "[REDACTED]"}}}},
        "note": "password",
    }


def test_redact_keys_extra_adds_words(capfd):
    """REDACT_KEYS_EXTRA adds its words (phrases too) to REDACT_KEYS, whose defaults still apply."""
    client = create_app({"TESTING": True, "REDACT_KEYS_EXTRA": ["email", "phone number"]}).test_client()
    payload = {"Email": "a@b.c", "phoneNumber": "555", "password": "p", "phone": "kept"}
    assert post_payload(client, capfd, payload) == {
        "Email": "[REDACTED]",
        "phoneNumber": "[REDACTED]",
        "password": "[REDACTED]",
        "phone": "kept",
    }


def test_redact_keys_extra_from_the_environment(monkeypatch, capfd):
    """ANALYTICS_REDACT_KEYS_EXTRA may be comma-separated, like every list setting."""
    monkeypatch.setenv("ANALYTICS_REDACT_KEYS_EXTRA", "email, iban")
    client = create_app({"TESTING": True}).test_client()
    payload = {"email": "a@b.c", "IBAN": "DE00", "token": "t"}
    assert post_payload(client, capfd, payload) == {"email": "[REDACTED]", "IBAN": "[REDACTED]", "token": "[REDACTED]"}


def test_redaction_off_writes_values_and_warns(capfd):
    """REDACT_PAYLOADS=false is the one way to turn redaction off: values are written as sent, and the
    start says so on stderr."""
    capfd.readouterr()
    client = create_app({"TESTING": True, "REDACT_PAYLOADS": False}).test_client()
    warnings = [json.loads(line) for line in capfd.readouterr().err.splitlines() if "redaction_off" in line]
    assert [(line["level"], line["event"], line["setting"]) for line in warnings] == [
        ("warning", "redaction_off", "REDACT_PAYLOADS")
    ]
    assert post_payload(client, capfd, {"password": "hunter2"}) == {"password": "hunter2"}


def test_redaction_on_says_nothing(capfd):
    """With the defaults the start logs no redaction warning."""
    capfd.readouterr()
    create_app({"TESTING": True})
    assert "redaction_off" not in capfd.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"REDACT_KEYS": []}, "REDACT_KEYS must name at least one secret word"),
        ({"REDACT_KEYS": ["password", " "]}, "REDACT_KEYS: ' ' is not a word"),
        ({"REDACT_KEYS": ["--"]}, "REDACT_KEYS: '--' is not a word"),
        ({"REDACT_KEYS_EXTRA": ["_"]}, "REDACT_KEYS_EXTRA: '_' is not a word"),
        ({"REDACT_KEYS_EXTRA": [1]}, "REDACT_KEYS_EXTRA must be a list of strings"),
        ({"REDACT_PAYLOADS": "no"}, "REDACT_PAYLOADS must be true or false"),
        ({"REDACT_PAYLOADS": 0}, "REDACT_PAYLOADS must be true or false"),
    ],
)
def test_redaction_settings_are_checked(overrides, named):
    """Settings that would leave redaction empty or unclear stop the start, naming the setting."""
    with pytest.raises(ValueError, match=named):
        create_app({"TESTING": True, **overrides})


@pytest.mark.parametrize("value", ["", " , ", "[]"])
def test_empty_redact_keys_from_the_environment_stop_the_start(monkeypatch, value):
    """ANALYTICS_REDACT_KEYS set to nothing is refused, not taken for "redact nothing"."""
    monkeypatch.setenv("ANALYTICS_REDACT_KEYS", value)
    with pytest.raises(ValueError, match="REDACT_KEYS must name at least one secret word"):
        create_app({"TESTING": True})


def test_a_long_key_costs_what_its_length_does():
    """Checking a 1 MiB key costs about what checking 1,024 keys of 1 KiB does: the cost is linear.

    The keys are made of words that begin secret words, so that a check trying every run of words
    (quadratic) or following a secret word from every letter would show here.
    """
    piece = "pAsSwOr_a1"
    small = piece * (1024 // len(piece))
    large = small * 1024
    assert len(small) > CACHED_KEY_CHARS and not DEFAULT.is_secret(large)

    def best_of_three(check: Any) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            check()
            times.append(time.perf_counter() - start)
        return min(times)

    one_large = best_of_three(lambda: DEFAULT.is_secret(large))
    many_small = best_of_three(lambda: [DEFAULT.is_secret(small) for _ in range(1024)])
    assert one_large / many_small < 5, (one_large, many_small)


def test_checking_new_keys_is_bounded_per_request(capfd):
    """A request may have at most KEY_CHARS_PER_REQUEST characters of never-seen keys checked: the values of
    further new keys are redacted unchecked (the safe side), with one diagnostic line; known keys still pass."""
    client = create_app({"TESTING": True}).test_client()
    warm = client.post("/api/analytics", json={"events": [{"type": "a", "payload": {"sku": 1}}]})
    assert warm.status_code == 200
    capfd.readouterr()
    keys = [f"{number:06}" + "x" * 994 for number in range(KEY_CHARS_PER_REQUEST // 1000 + 8)]
    events = [
        {"type": "a", "payload": {key: 1 for key in keys[start : start + 8]} | {"sku": 2}}
        for start in range(0, len(keys), 8)
    ]
    response = client.post("/api/analytics", json={"events": events})
    assert (response.status_code, response.json) == (200, {"success": True, "received": len(events)})
    out, err = capfd.readouterr()
    payloads = [line["payload"] for line in parse_lines(out.encode())]
    values = [payload[key] for payload in payloads for key in payload if key != "sku"]
    checked = KEY_CHARS_PER_REQUEST // 1000
    assert values[:checked] == [1] * checked
    assert values[checked:] == ["[REDACTED]"] * (len(keys) - checked)
    assert all(payload["sku"] == 2 for payload in payloads)
    assert [json.loads(line)["event"] for line in err.splitlines()] == ["redaction_budget_spent"]


# The rule as the documentation words it, written plainly (and slowly): the expression must agree with it.


def kind(char: str) -> str:
    """What a character is to the rule: a separator, a digit, an upper-case letter or another letter."""
    if not char.isalnum():
        return "separator"
    if char.isdecimal():
        return "digit"
    # Case is read in the Basic Multilingual Plane only; letters past it count as caseless.
    if (char.isupper() or char.istitle()) and ord(char) < 0x10000:
        return "upper"
    return "letter"


def words(key: str) -> list[str]:
    """The key's words: split at separators, between digits and letters, before an upper-case letter
    that follows another letter, and before the last capital of an acronym followed by a small letter."""
    found, word = [], ""
    kinds = [kind(char) for char in key] + ["separator"]
    for index, char in enumerate(key):
        this, before, after = kinds[index], kinds[index - 1], kinds[index + 1]
        if this == "separator":
            found.append(word)
            word = ""
            continue
        if word and (
            (before == "digit") != (this == "digit")
            or (before == "letter" and this == "upper")
            or (before == this == "upper" and after == "letter")
        ):
            found.append(word)
            word = ""
        word += char
    return [word for word in [*found, word] if word]


def is_secret_by_the_rule(key: str, secrets: set[str]) -> bool:
    """Whether some run of the key's words, joined and lower-cased letter by letter, is a secret word or its plural."""
    lowered = ["".join(char.lower() for char in word) for word in words(key)]
    for start in range(len(lowered)):
        for end in range(start + 1, len(lowered) + 1):
            run = "".join(lowered[start:end])
            if run in secrets or (run.endswith("s") and run[:-1] in secrets):
                return True
    return False


ENTRIES = [*Config.REDACT_KEYS, "contraseña", "密码", "2fa", "abab"]
SECRETS = {secret_word(entry) for entry in ENTRIES}
WITH_ENTRIES = Redactor(ENTRIES)
# Pieces of keys that reach the rule's corners: both cases, acronyms, digits, separators, letters
# that lower-case unusually (the Kelvin sign, dotted I, final sigma), caseless and astral letters.
PIECES = st.sampled_from(
    [*"pastwordkenicvyf", *"PASWDTOKENICVYF", *"_- .0129", *"éÉßİΣςñÑ密码²K\U00010400\U0001f600ǅǆ", "ab", "AB", "Ab"]
)
keys = st.lists(PIECES, max_size=16).map("".join)


@st.composite
def spelled_secrets(draw: st.DrawFn) -> str:
    """A secret word, maybe plural, each letter in either case and maybe followed by a separator, among other pieces."""
    word = draw(st.sampled_from(sorted(SECRETS))) + draw(st.sampled_from(["", "s"]))
    letters = [
        draw(st.sampled_from([char, char.upper()])) + draw(st.sampled_from(["", "", "_", " ", "\U0001f600"]))
        for char in word
    ]
    return draw(keys) + "".join(letters) + draw(keys)


@settings(max_examples=600, deadline=None)
@given(st.one_of(keys, spelled_secrets()))
def test_the_expression_follows_the_rule(key):
    """On keys built to reach every corner of the rule, the expression and the plain rule agree."""
    assert WITH_ENTRIES.is_secret(key) == is_secret_by_the_rule(key, SECRETS)
