"""Protocol-neutral sensitive-value detectors: what they catch, what they must leave alone, and
column-name rules."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import detectors as det
from policy.detectors import column_category, find, luhn_ok, mask_text

# (text, detector expected to fire, the exact sensitive span)
POSITIVE = [
    ("mail bob.smith+x@mail.example.co.uk now", "email", "bob.smith+x@mail.example.co.uk"),
    ("<a@b.io>", "email", "a@b.io"),
    ("visa 4111 1111 1111 1111 ok", "credit_card", "4111 1111 1111 1111"),
    ("mc 5500-0000-0000-0004", "credit_card", "5500-0000-0000-0004"),
    ("amex 378282246310005", "credit_card", "378282246310005"),
    ("amex 3782-822463-10005", "credit_card", "3782-822463-10005"),
    ("discover 6011111111111117.", "credit_card", "6011111111111117"),
    ("ssn 078-05-1120", "us_ssn", "078-05-1120"),
    ("ssn 123 45 6789", "us_ssn", "123 45 6789"),
    ("nino AB123456C", "uk_nino", "AB123456C"),
    ("nino AB 12 34 56 C", "uk_nino", "AB 12 34 56 C"),
    ("dni 12345678Z", "es_dni", "12345678Z"),
    ("nie X1234567L", "es_dni", "X1234567L"),
    ("iban DE89 3704 0044 0532 0130 00", "iban", "DE89 3704 0044 0532 0130 00"),
    ("iban GB82WEST12345698765432", "iban", "GB82WEST12345698765432"),
    ("call +44 20 7946 0958", "phone", "+44 20 7946 0958"),
    ("call (415) 555-2671", "phone", "(415) 555-2671"),
    ("call 415-555-2671", "phone", "415-555-2671"),
    ("call +14155552671", "phone", "+14155552671"),
    ("key AKIAIOSFODNN7EXAMPLE", "aws_access_key", "AKIAIOSFODNN7EXAMPLE"),
    ("tmp ASIAY34FZKBOKMUTVV7A", "aws_access_key", "ASIAY34FZKBOKMUTVV7A"),
    ("gh ghp_" + "A1b2" * 9, "github_token", "ghp_" + "A1b2" * 9),
    ("pat github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "github_token",
     "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"),
    ("openai sk-proj-abcdefghijklmnopqrstuvwxyz0123", "openai_key", "sk-proj-abcdefghijklmnopqrstuvwxyz0123"),
    ("anthropic sk-ant-api03-abcdefghijklmnopqrstuvwxyz", "openai_key", "sk-ant-api03-abcdefghijklmnopqrstuvwxyz"),
    ("stripe sk_live_abcdefghijklmnop1234", "stripe_key", "sk_live_abcdefghijklmnop1234"),
    ("slack xoxb-123456789012-abcdefABCDEF", "slack_token", "xoxb-123456789012-abcdefABCDEF"),
    ("g AIzaSyA1234567890abcdefghijklmnopqrstuv", "google_api_key", "AIzaSyA1234567890abcdefghijklmnopqrstuv"),
    ("Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "jwt",
     "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----\ntail", "private_key",
     "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn", "private_key", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn"),
    ("dsn postgres://app:s3cr3t@db:5432/x", "url_credentials", "s3cr3t"),
    ("CREATE ROLE x PASSWORD 'it''s'", "sql_password", "it''s"),
    ("host=db password=hunter2 user=x", "secret_assignment", "hunter2"),
    ('AWS_SECRET_ACCESS_KEY="abc/def+ghi"', "secret_assignment", "abc/def+ghi"),
    ("api_key: 'k-123'", "secret_assignment", "k-123"),
    ('{"client_secret": "zzz"}', "secret_assignment", "zzz"),
]


@pytest.mark.parametrize("text,name,span", POSITIVE, ids=[p[1] + ":" + p[0][:20] for p in POSITIVE])
def test_detector_fires(text, name, span):
    found = [f for f in find(text) if f.detector == name]
    assert found, f"{name} missed in {text!r}: {find(text)}"
    assert text[found[0].start:found[0].end] == span


NEGATIVE = [
    "plain words only",
    "order 4111111111111112 (bad Luhn)",
    "1234567812345678",  # Luhn-valid? starts with 1: not an issuer range
    "ssn 000-12-3456 and 666-12-3456 and 900-12-3456 and 123-00-4567 and 123-45-0000",
    "nino BG123456C",  # prefix never issued
    "dni 12345678A",  # wrong check letter
    "iban DE00 3704 0044 0532 0130 00",  # bad mod-97
    "date 2023-10-05 12:30:00, version 1.2.3, id 123456789",
    "ip 192.168.100.200",
    "AKIA short",
    "sk-short",
    "user@localhost",  # no TLD
    "ghp_tooShort",
    "eyJhbGciOiJIUzI1NiJ9 alone",
    "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "price 1,234,567.89",
]


@pytest.mark.parametrize("text", NEGATIVE)
def test_detectors_stay_quiet(text):
    assert find(text) == []


def test_luhn():
    assert luhn_ok("4111111111111111")
    assert luhn_ok("79927398713")
    assert not luhn_ok("79927398710")


def test_findings_are_sorted_and_disjoint():
    text = "a@b.io then 4111111111111111 then postgres://u:p@h then a@b.io"
    found = find(text)
    assert [f.detector for f in found] == ["email", "credit_card", "url_credentials", "email"]
    assert all(a.end <= b.start for a, b in zip(found, found[1:], strict=False))


def test_overlap_prefers_the_earlier_longer_span():
    # The email's local part is also digits; only one finding may cover it.
    found = find("4111111111111111@example.com")
    assert len(found) == 1


def test_mask_text():
    assert mask_text("key AKIAIOSFODNN7EXAMPLE, mail x@y.org") == "key [masked:aws_access_key], mail [masked:email]"
    assert mask_text("nothing here") == "nothing here"
    assert mask_text("a@b.io", replace=lambda name: "***") == "***"


def test_mask_text_with_selected_detectors():
    text = "x@y.org 078-05-1120"
    assert mask_text(text, det.resolve(["email"])) == "[masked:email] 078-05-1120"
    assert mask_text(text, det.resolve(["national_id"])) == "x@y.org [masked:us_ssn]"
    assert mask_text(text, det.resolve([])) == text
    assert mask_text(text, det.resolve(["not-a-detector"])) == text


def test_groups_and_known():
    assert det.GROUPS["api_key"] <= set(det.DETECTORS)
    assert det.GROUPS["all"] == set(det.DETECTORS)
    assert det.known("pii") and det.known("email") and not det.known("users.email")


def test_placeholder_is_safe_in_json_xml_and_arrays():
    p = det.placeholder("email")
    assert not set(p) & set('"\\,{}<>& \t\n\'')


@pytest.mark.parametrize("name,category", [
    ("password", "password"),
    ("password_hash", "password"),
    ("userPassword", "password"),
    ("PASSWD", "password"),
    ("client_secret", "secret"),
    ("refresh_token", "token"),
    ("api_key", "api_key"),
    ("apiKey", "api_key"),
    ("aws_secret_access_key", "api_key"),
    ("private_key_pem", "api_key"),
    ("ssn", "ssn"),
    ("social_security_number", "ssn"),
    ("tax_id", "national_id"),
    ("passport_number", "national_id"),
    ("credit_card", "credit_card"),
    ("card_number", "credit_card"),
    ("cvv", "credit_card"),
    ("iban", "bank_account"),
    ("account_number", "bank_account"),
    ("date_of_birth", "date_of_birth"),
    ("birth_date", "date_of_birth"),
    ("dob", "date_of_birth"),
    # metadata about a secret is not the secret
    ("password_changed_at", None),
    ("token_count", None),
    ("api_key_id", None),
    ("password_reset_required", None),
    ("secret_version", None),
    # ordinary names
    ("id", None), ("email", None), ("name", None), ("key", None), ("passenger", None), ("tokenizer", None),
    ("", None),
])
def test_column_category(name, category):
    assert column_category(name) == category


def test_column_words():
    assert det.column_words("userPasswordHash") == ["user", "password", "hash"]
    assert det.column_words("API_KEY") == ["api", "key"]
    assert det.column_words("HTTPToken2") == ["http", "token", "2"]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_find_and_mask(text):
    found = find(text)
    for f in found:
        assert 0 <= f.start < f.end <= len(text)
    masked = mask_text(text)
    if not found:
        assert masked == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="0123456789 -+().@aA_:=/", max_size=2000))
def test_fuzz_no_catastrophic_backtracking(text):
    find(text)  # deadline-free run; the timeout of the suite catches a pathological regex


@pytest.mark.parametrize("text", [
    "password" * 10000, "password '" * 10000, "a.a." * 20000 + "://", "token: " * 20000, "a_" * 50000 + "token",
    "a" * 100000 + "@", "1" * 100000, "+1" + " 1" * 20000, "a@" + "b." * 20000, "(1) " * 30000, 'k="' * 20000,
])
def test_adversarial_inputs_stay_linear(text):
    start = time.perf_counter()
    find(text)
    assert time.perf_counter() - start < 2.0


def test_span_registry_for_other_handlers():
    reg = det.span_registry()
    assert set(det.DETECTORS) <= set(reg) and "pii" in reg
    assert reg["email"]("to a@b.io") == [(3, 9)]
    assert reg["pii"]("a@b.io 078-05-1120") == [(0, 6), (7, 18)]
    assert reg["jwt"]("a@b.io") == []
