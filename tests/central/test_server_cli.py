"""`interlock recorder …` verbs: what they print, --json, and one-line errors with the fix."""

from __future__ import annotations

import json
import subprocess
import sys


def _interlock(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "interceptor.cli", "recorder", *args], capture_output=True, text=True, timeout=120)


def test_hosts_lists_joined_hosts_as_text_and_json(recorder, joined):
    h = joined("listed")
    assert h.ingest(h.records(4)).status == 200
    text = _interlock("hosts", "--database", recorder.dsn)
    assert text.returncode == 0 and h.host_id in text.stdout and "listed" in text.stdout
    data = json.loads(_interlock("hosts", "--json", "--database", recorder.dsn).stdout)
    mine = next(x for x in data["hosts"] if x["host"] == h.host_id)
    assert mine["head_seq"] == 4 and mine["revoked_at"] is None and mine["findings"] == 0


def test_token_verb_stores_only_a_hash_of_the_secret(recorder):
    out = json.loads(_interlock("token", "--json", "--state", str(recorder.state), "--database", recorder.dsn, "--expires", "10m").stdout)
    token = out["token"]
    prefix, tid, secret, ca = token.split(".")
    assert prefix == "il1" and ca == recorder.ca_sha256 and tid == out["id"]
    dump = recorder.psql(f"SELECT * FROM enrolment_tokens WHERE id = '{tid}'")
    assert secret not in dump
    assert recorder.psql(f"SELECT expires_at - created_at < interval '11 minutes' FROM enrolment_tokens WHERE id = '{tid}'") == "t"


def test_errors_are_one_line_with_the_fix(recorder, tmp_path):
    cases = [
        (("token", "--state", str(recorder.state), "--database", recorder.dsn, "--expires", "soon"), "30m, 1h or 7d"),
        (("token", "--state", str(tmp_path / "none"), "--database", recorder.dsn), "interlock recorder init"),
        (("revoke", "no-such-host", "--database", recorder.dsn), "interlock recorder hosts"),
        (("init", "--state", str(recorder.state), "--name", "again.test"), "--force"),
        (("serve", "--state", str(recorder.state), "--database", recorder.dsn, "--listen", "nonsense"), "HOST:PORT"),
        (("serve", "--state", str(recorder.state), "--database", recorder.dsn, "--web", str(tmp_path / "web.yaml")),
         "--web: "),
        (("hosts", "--database", f"host={tmp_path} port=1"), "cannot connect to PostgreSQL"),
    ]
    for args, words in cases:
        r = _interlock(*args)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1


def test_operator_verb_issues_a_working_certificate(recorder, tmp_path):
    from central_kit import call

    from lab.central import Client

    out = tmp_path / "ops"
    r = _interlock("operator", "carol", "--state", str(recorder.state), "--out", str(out))
    assert r.returncode == 0 and (out / "operator.key").stat().st_mode & 0o777 == 0o600
    carol = Client(recorder.url, out / "ca.pem", out / "operator.crt", out / "operator.key")
    assert call(recorder, carol, "GET", "/v1/hosts").status == 200


def test_init_with_an_address_as_the_name_makes_a_certificate_for_that_address(tmp_path):
    """`--name 10.0.0.5` (what an operator without DNS types): hosts joining https://10.0.0.5:8443
    check an IP SAN, so the name goes there; before, the certificate held it as a DNS name and every
    join failed with 'IP address mismatch'."""
    import ipaddress

    from cryptography import x509

    from central import ca

    sd = ca.StateDir(tmp_path / "st")
    ca.init(sd, "10.0.0.5", ["10.0.0.5", "127.0.0.1"])
    cert = x509.load_pem_x509_certificate(sd.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == []
    sd2 = ca.StateDir(tmp_path / "dns")  # control: a DNS name stays a DNS name
    ca.init(sd2, "recorder.test", ["10.0.0.6"])
    san2 = x509.load_pem_x509_certificate(sd2.server_cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san2.get_values_for_type(x509.DNSName) == ["recorder.test"]
