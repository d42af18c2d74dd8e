"""Masking of JSON bodies for MASK decisions, and redaction of secrets for recordings."""

from __future__ import annotations

import json

import pytest

from proxy.http.masking import (
    REDACTED,
    MaskReport,
    MaskSpec,
    is_json_content_type,
    mask_json,
    mask_json_bytes,
    mask_text,
    redact_headers,
    redact_query,
    regex_detector,
)

EMAIL = regex_detector(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
DIGITS16 = regex_detector(r"\b(?:\d[ -]?){15}\d\b")

DOC = {
    "user": {"name": "Ada", "email": "ada@example.com", "password": "hunter2", "age": 36, "admin": True},
    "items": [{"card": "4111 1111 1111 1111", "note": "call bob@example.org"}, {"card": None}],
    "Token": {"value": "abc", "expires": 3600, "scopes": ["a", "b"]},
    "free": "nothing here",
}


def test_key_rules_any_depth_case_insensitive_and_type_preserving() -> None:
    out = mask_json(DOC, MaskSpec(keys=("password", "token")))
    assert out["user"]["password"] == "***"
    assert out["Token"] == {"value": "***", "expires": 0, "scopes": ["***", "***"]}
    assert out["user"]["email"] == "ada@example.com"
    assert DOC["user"]["password"] == "hunter2"  # input untouched


def test_dotted_and_glob_rules() -> None:
    out = mask_json(DOC, MaskSpec(keys=("user.email", "items.card", "*ass*")))
    assert out["user"]["email"] == "***" and out["user"]["password"] == "***"
    assert [i["card"] for i in out["items"]] == ["***", None]
    assert out["user"]["name"] == "Ada"


def test_detectors_mask_inside_strings() -> None:
    spec = MaskSpec(detectors={"email": EMAIL, "card": DIGITS16})
    rep = MaskReport()
    out = mask_json(DOC, spec, rep)
    assert out["user"]["email"] == "***"
    assert out["items"][0]["note"] == "call ***"
    assert out["items"][0]["card"] == "***"
    assert out["free"] == "nothing here"
    assert rep.detector_hits == {"email": 2, "card": 1}


def test_overlapping_spans_merge() -> None:
    def a(t: str) -> list[tuple[int, int]]:
        return [(0, 5)]

    def b(t: str) -> list[tuple[int, int]]:
        return [(3, 8), (100, 200)]  # out of range span ignored

    assert mask_text("0123456789", {"a": a, "b": b}) == "***89"


def test_from_names_splits_detectors_and_keys() -> None:
    spec = MaskSpec.from_names(("email", "ssn_field", "password"), {"email": EMAIL})
    assert spec.keys == ("ssn_field", "password")
    assert list(spec.detectors) == ["email"]


def test_mask_json_bytes() -> None:
    body = json.dumps(DOC).encode()
    out, rep = mask_json_bytes(body, MaskSpec(keys=("password",), detectors={"email": EMAIL}))
    doc = json.loads(out)
    assert doc["user"]["password"] == "***" and doc["user"]["email"] == "***"
    assert rep.fields == ["user.password"] and rep.changed
    # Unchanged bodies come back identical, byte for byte.
    same, rep2 = mask_json_bytes(b'{"a":  1}', MaskSpec(keys=("b",)))
    assert same == b'{"a":  1}' and not rep2.changed


def test_mask_json_bytes_ndjson_and_non_json() -> None:
    nd = b'{"email":"a@b.co"}\n{"x":1}\n'
    out, _ = mask_json_bytes(nd, MaskSpec(keys=("email",)))
    assert out == b'{"email":"***"}\n{"x":1}\n'
    assert mask_json_bytes(b"<html>", MaskSpec(keys=("a",))) is None
    assert mask_json_bytes(b"\xff\xfe", MaskSpec(keys=("a",))) is None
    assert mask_json_bytes(b"", MaskSpec(keys=("a",))) is None


def test_unicode_survives() -> None:
    out, _ = mask_json_bytes('{"n":"Zoë","pw":"x"}'.encode(), MaskSpec(keys=("pw",)))
    assert json.loads(out) == {"n": "Zoë", "pw": "***"}


def test_is_json_content_type() -> None:
    for ct in ("application/json", "application/json; charset=utf-8", "application/x-amz-json-1.0",
               "application/problem+json"):
        assert is_json_content_type(ct)
    for ct in (None, "", "text/html", "application/xml"):
        assert not is_json_content_type(ct)


def test_redact_headers() -> None:
    hdrs = [
        ("Authorization", "AWS4-HMAC-SHA256 Credential=AKIA/20240101/us-east-1/s3/aws4_request, Signature=ab"),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
        ("Cookie", "session=s3cr3t; theme=dark"),
        ("Set-Cookie", "sid=xyz; Path=/; HttpOnly"),
        ("X-Amz-Security-Token", "FwoGZXIvYXdzE"),
        ("Content-Type", "application/json"),
        ("X-Custom-Secret", "v"),
    ]
    out = redact_headers(hdrs, extra=("x-custom-secret",))
    text = repr(out)
    for secret in ("AKIA", "dXNlcjpwYXNz", "s3cr3t", "xyz", "FwoGZXIvYXdzE", "'v'"):
        assert secret not in text
    assert out[0] == ("Authorization", f"AWS4-HMAC-SHA256 {REDACTED}")
    assert out[1] == ("Proxy-Authorization", f"Basic {REDACTED}")
    assert out[2] == ("Cookie", f"session={REDACTED}; theme={REDACTED}")
    assert out[3] == ("Set-Cookie", f"sid={REDACTED}; Path=/; HttpOnly")
    assert out[5] == ("Content-Type", "application/json")
    assert redact_headers([("authorization", "opaque")]) == [("authorization", REDACTED)]


def test_redact_query() -> None:
    q = ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2024&X-Amz-Signature=deadbeef"
         "&X-Amz-Security-Token=tok&page=2&flag")
    out = redact_query(q)
    assert "deadbeef" not in out and "tok&" not in out and "AKIA" not in out
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in out and "page=2" in out and out.endswith("&flag")
    assert redact_query("") == ""
    assert redact_query("mine=1", extra=("MINE",)) == "mine=%5BREDACTED%5D"


def test_with_the_shared_policy_detectors() -> None:
    """The registry and column rules of policy.detectors plug in without adapters."""
    detectors = pytest.importorskip("policy.detectors")
    spec = MaskSpec.from_names(("email", "credit_card", "password", "api_key"), detectors.span_registry(),
                               replacement=detectors.placeholder, key_classifier=detectors.column_category)
    assert {"email", "credit_card"} <= set(spec.detectors)
    body = json.dumps({
        "users": [{"contact": "write to ada@example.com", "userPassword": "hunter2", "password_changed_at": "2024",
                   "apiKey": "k-123", "card": "4111 1111 1111 1111", "note": "order 1234"}],
    }).encode()
    out, rep = mask_json_bytes(body, spec)
    user = json.loads(out)["users"][0]
    assert user["contact"] == "write to [masked:email]"
    assert user["userPassword"] == "[masked:field]"
    assert user["apiKey"] == "[masked:field]"
    assert user["password_changed_at"] == "2024"  # about a password, not one
    assert user["card"] == "[masked:credit_card]"
    assert user["note"] == "order 1234"
    assert sorted(rep.fields) == ["users.apiKey", "users.userPassword"]
