"""The credential store: sealed at rest, root-only files, secrets never listed."""

from __future__ import annotations

import stat

import pytest

from credentials.store import CredentialError, CredentialStore


def test_round_trip_and_files_are_private(tmp_path):
    s = CredentialStore(tmp_path / "state")
    s.put("orders-db", "postgres", {"user": "app", "password": "s3cret-pw"})
    s.put("aws-prod", "aws", {"access_key_id": "AKIAREAL", "secret_access_key": "wJalr/REAL"})
    assert s.get("orders-db") == {"kind": "postgres", "user": "app", "password": "s3cret-pw"}
    for f in (s.key_file, s.sealed):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    raw = s.sealed.read_bytes()
    assert b"s3cret-pw" not in raw and b"wJalr" not in raw and b"app" not in raw
    listed = s.listing()
    assert {x["name"] for x in listed} == {"orders-db", "aws-prod"}
    assert "s3cret-pw" not in str(listed) and "wJalr" not in str(listed)
    assert CredentialStore(tmp_path / "state").get("aws-prod")["secret_access_key"] == "wJalr/REAL"
    assert s.delete("orders-db") and s.get("orders-db") is None


def test_bad_input_is_refused_with_what_is_missing(tmp_path):
    s = CredentialStore(tmp_path)
    with pytest.raises(CredentialError, match="needs password"):
        s.put("x", "postgres", {"user": "u"})
    with pytest.raises(CredentialError, match="unknown kind"):
        s.put("x", "ftp", {})


def test_a_lost_key_is_a_clear_error(tmp_path):
    s = CredentialStore(tmp_path)
    s.put("t", "bearer", {"token": "tok"})
    s.key_file.unlink()
    with pytest.raises(CredentialError, match="is missing"):
        CredentialStore(tmp_path).get("t")
