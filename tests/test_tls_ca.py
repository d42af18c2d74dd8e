"""The CA mints leaves that a stock TLS client accepts for exactly the name it asked for."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.tls.ca import CAError, CertificateAuthority, LeafMinter, normalize_host, write_bundle


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("Test CA")


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, server_hostname: str | None) -> ssl.SSLObject:
    """A full TLS handshake in memory: no sockets, both ends driven by hand."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return client
    raise AssertionError("handshake did not finish")


def client_context(ca: CertificateAuthority) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    ctx.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)
    return ctx


def test_ca_is_a_constrained_ca(ca: CertificateAuthority) -> None:
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    ku = ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)


def test_rsa_ca() -> None:
    rca = CertificateAuthority.create(key_type="rsa")
    assert isinstance(rca.key, rsa.RSAPrivateKey) and rca.key.key_size == 2048
    minter = LeafMinter(rca, key_type="rsa")
    handshake(client_context(rca), minter.server_context("rsa.example"), "rsa.example")


def test_save_load_and_key_mode(tmp_path, ca: CertificateAuthority) -> None:
    ca.save(tmp_path / "c.pem", tmp_path / "k.pem")
    assert stat.S_IMODE(os.stat(tmp_path / "k.pem").st_mode) == 0o600
    again = CertificateAuthority.load(tmp_path / "c.pem", tmp_path / "k.pem")
    assert again.fingerprint_sha256 == ca.fingerprint_sha256


def test_load_or_create_is_stable(tmp_path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path / "ca")
    assert stat.S_IMODE(os.stat(tmp_path / "ca" / "ca.key").st_mode) == 0o600
    assert b"BEGIN CERTIFICATE" in (tmp_path / "ca" / "ca.pem").read_bytes()
    second = CertificateAuthority.load_or_create(tmp_path / "ca")
    assert first.fingerprint_sha256 == second.fingerprint_sha256


def test_load_rejects_mismatched_key(tmp_path, ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create()
    ca.save(tmp_path / "c.pem", tmp_path / "k.pem")
    other.save(tmp_path / "c2.pem", tmp_path / "k2.pem")
    with pytest.raises(CAError, match="does not match"):
        CertificateAuthority.load(tmp_path / "c.pem", tmp_path / "k2.pem")
    with pytest.raises(CAError):
        CertificateAuthority.load(tmp_path / "missing.pem", tmp_path / "k.pem")


def test_load_rejects_non_ca(tmp_path, ca: CertificateAuthority) -> None:
    leaf = LeafMinter(ca).leaf("x.example")
    (tmp_path / "leaf.pem").write_bytes(leaf.cert_pem)
    (tmp_path / "leaf.key").write_bytes(leaf.key_pem)
    with pytest.raises(CAError, match="not a CA"):
        CertificateAuthority.load(tmp_path / "leaf.pem", tmp_path / "leaf.key")


def test_leaf_dns_name(ca: CertificateAuthority) -> None:
    minter = LeafMinter(ca, validity=dt.timedelta(hours=12))
    leaf = minter.leaf("API.Example.COM.")
    san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.example.com"]
    bc = leaf.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not bc.ca
    life = leaf.cert.not_valid_after_utc - leaf.cert.not_valid_before_utc
    assert life <= dt.timedelta(hours=14)
    assert leaf.chain_pem.endswith(ca.cert_pem)


def test_leaf_ip_sans(ca: CertificateAuthority) -> None:
    minter = LeafMinter(ca)
    for host, want in (("10.1.2.3", "10.1.2.3"), ("[::1]", "::1"), ("2001:DB8::1", "2001:db8::1")):
        leaf = minter.leaf(host)
        san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(want)]
        assert san.get_values_for_type(x509.DNSName) == []


def test_long_name_goes_in_san_only(ca: CertificateAuthority) -> None:
    host = ("a" * 60) + ".bucket-name.s3.us-east-1.amazonaws.com"
    leaf = LeafMinter(ca).leaf(host)
    san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [host]


def test_cache_hits_and_lru_eviction(ca: CertificateAuthority) -> None:
    minter = LeafMinter(ca, cache_size=2)
    a = minter.leaf("a.example")
    assert minter.leaf("A.example") is a
    assert minter.minted == 1
    minter.leaf("b.example")
    minter.leaf("a.example")  # a is now most recent
    minter.leaf("c.example")  # evicts b
    assert len(minter) == 2
    assert minter.leaf("a.example") is a
    minter.leaf("b.example")
    assert minter.minted == 4


def test_renews_near_expiry(ca: CertificateAuthority) -> None:
    minter = LeafMinter(ca, validity=dt.timedelta(hours=2), renew_before=dt.timedelta(minutes=30))
    first = minter.leaf("r.example")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1, minutes=45)
    second = minter.leaf("r.example", now=later)
    assert second is not first
    assert second.not_after > first.not_after


def test_stock_client_verifies_dns_leaf(ca: CertificateAuthority) -> None:
    minter = LeafMinter(ca)
    client = handshake(client_context(ca), minter.server_context("svc.example.org"), "svc.example.org")
    assert client.selected_alpn_protocol() in (None, "http/1.1")
    assert minter.server_context("svc.example.org") is minter.server_context("SVC.example.org")


def test_stock_client_verifies_ip_leaf(ca: CertificateAuthority) -> None:
    minter = LeafMinter(ca)
    handshake(client_context(ca), minter.server_context("127.0.0.1"), "127.0.0.1")


def test_wrong_name_is_refused(ca: CertificateAuthority) -> None:
    minter = LeafMinter(ca)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(client_context(ca), minter.server_context("good.example"), "evil.example")


def test_other_ca_is_refused(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create()
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(client_context(other), LeafMinter(ca).server_context("x.example"), "x.example")


def test_sni_callback_switches_context(ca: CertificateAuthority) -> None:
    minter = LeafMinter(ca)
    default = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    seen: list[str | None] = []

    def on_sni(obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen.append(name)
        obj.context = minter.server_context(name or "127.0.0.1")

    default.sni_callback = on_sni
    handshake(client_context(ca), default, "picked.example")
    assert seen == ["picked.example"]


def test_normalize_host_rejects_garbage() -> None:
    for bad in ("", ".", "a/b", "a b"):
        with pytest.raises(ValueError):
            normalize_host(bad)
    assert normalize_host("bücher.example") == "xn--bcher-kva.example"


def test_bundle_has_system_and_ours(tmp_path, ca: CertificateAuthority) -> None:
    system = tmp_path / "system.crt"
    other = CertificateAuthority.create("Some Public Root")
    system.write_bytes(other.cert_pem)
    out = write_bundle(ca, tmp_path / "out" / "bundle.pem", system_bundle=system)
    certs = x509.load_pem_x509_certificates(out.read_bytes())
    assert [c.subject for c in certs] == [other.cert.subject, ca.cert.subject]
    # Usable as a trust store for both worlds.
    ctx = ssl.create_default_context(cafile=str(out))
    handshake(ctx, LeafMinter(ca).server_context("b.example"), "b.example")
    handshake(ctx, LeafMinter(other).server_context("c.example"), "c.example")


def test_bundle_with_real_system_store(tmp_path, ca: CertificateAuthority) -> None:
    out = write_bundle(ca, tmp_path / "bundle.pem")
    data = out.read_bytes()
    assert data.endswith(ca.cert_pem)
    if os.path.exists("/etc/ssl/certs/ca-certificates.crt"):
        assert data.count(b"BEGIN CERTIFICATE") > 1


def test_bundle_without_system(tmp_path, ca: CertificateAuthority) -> None:
    out = write_bundle(ca, tmp_path / "b.pem", system_bundle=tmp_path / "nope")
    assert out.read_bytes().count(b"BEGIN CERTIFICATE") == 1
