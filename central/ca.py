"""The recorder's certificate authority (ECDSA P-256, `cryptography`): the server's TLS certificate,
hosts' client certificates (signed from their CSR at join, CN = host_id, OU = host) and operators'
(CN = name, OU = operator).

Files in the state dir, shared by every instance behind a load balancer: ca.pem, ca.key (0600),
server.crt, server.key (0600). A host pins the CA by the SHA-256 of its DER encoding (the last
field of an enrolment token). Revocation is not by CRL: hosts.revoked_at is checked on every
request."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST_OU, OPERATOR_OU = "host", "operator"
CA_DAYS, LEAF_DAYS = 3650, 825


class CAError(Exception):
    """A CA file or a CSR is unusable; the message says what to do."""


class StateDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.ca_cert, self.ca_key = self.path / "ca.pem", self.path / "ca.key"
        self.server_cert, self.server_key = self.path / "server.crt", self.path / "server.key"

    def exists(self) -> bool:
        return self.ca_cert.exists() and self.ca_key.exists()

    def need(self) -> None:
        for f in (self.ca_cert, self.ca_key, self.server_cert, self.server_key):
            if not f.exists():
                raise CAError(f"{f} is missing: run 'interlock recorder init --state {self.path} --name DNSNAME' first")


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(cn: str, ou: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Interlock recorder")]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def init(state: StateDir, name: str, ips: list[str], force: bool = False) -> str:
    """Make the CA and the server certificate for DNS `name` and `ips`; returns the CA's SHA-256 (hex)."""
    if state.exists() and not force:
        raise CAError(f"{state.path} already holds a CA (hosts trust it): keep it, or pass --force to replace it "
                      "(every joined host must then join again)")
    try:
        addrs = [ipaddress.ip_address(a) for a in ips]
    except ValueError as e:
        raise CAError(f"--ip: {e}") from None
    state.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(f"Interlock recorder CA ({name})")
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(state.ca_key, _key_pem(key), 0o600)
    _write(state.ca_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    skey = ec.generate_private_key(ec.SECP256R1())
    try:  # `--name 10.0.0.5`: hosts reach it by that address, which TLS checks against an IP SAN
        named_ip = ipaddress.ip_address(name)
    except ValueError:
        named_ip = None
    san = [x509.IPAddress(named_ip) if named_ip else x509.DNSName(name), *(x509.IPAddress(a) for a in addrs if a != named_ip)]
    scert = _leaf(key, cert, skey.public_key(), _name(name), ExtendedKeyUsageOID.SERVER_AUTH, san)
    _write(state.server_key, _key_pem(skey), 0o600)
    _write(state.server_cert, scert.public_bytes(serialization.Encoding.PEM), 0o644)
    return ca_sha256(state)


def _leaf(ca_key, ca_cert: x509.Certificate, public_key, subject: x509.Name, usage, san=None) -> x509.Certificate:
    now = _now()
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject).public_key(public_key)
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def _load_ca(state: StateDir) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    state.need()
    key = serialization.load_pem_private_key(state.ca_key.read_bytes(), password=None)
    return key, x509.load_pem_x509_certificate(state.ca_cert.read_bytes())


def ca_sha256(state: StateDir) -> str:
    cert = x509.load_pem_x509_certificate(state.ca_cert.read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def sign_host_csr(state: StateDir, csr_pem: str, host_id: str) -> x509.Certificate:
    """A client certificate for `host_id` over the CSR's key. Only the key is taken from the CSR:
    the subject is ours (CN = host_id, OU = host), so a host cannot ask for an operator's OU.
    Raises CAError for an unreadable CSR, a bad self-signature or a weak key."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except (ValueError, TypeError):
        raise CAError("csr: not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise CAError("csr: its signature does not verify (it must be signed by the key it carries)")
    pub = csr.public_key()
    ok = (isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.key_size >= 256) or isinstance(pub, ed25519.Ed25519PublicKey) \
        or (isinstance(pub, rsa.RSAPublicKey) and pub.key_size >= 2048)
    if not ok:
        raise CAError("csr: the key must be ECDSA P-256 or larger, Ed25519, or RSA >= 2048 bits")
    ca_key, ca_cert = _load_ca(state)
    return _leaf(ca_key, ca_cert, pub, _name(host_id, HOST_OU), ExtendedKeyUsageOID.CLIENT_AUTH)


def issue_operator(state: StateDir, name: str, out: Path) -> tuple[Path, Path]:
    """An operator's client certificate (OU = operator) and key in `out` (operator.crt, operator.key 0600, ca.pem)."""
    ca_key, ca_cert = _load_ca(state)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(ca_key, ca_cert, key.public_key(), _name(name, OPERATOR_OU), ExtendedKeyUsageOID.CLIENT_AUTH)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    crt, kf = out / "operator.crt", out / "operator.key"
    _write(kf, _key_pem(key), 0o600)
    _write(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(out / "ca.pem", state.ca_cert.read_bytes(), 0o644)
    return crt, kf


def server_context(state: StateDir) -> ssl.SSLContext:
    """TLS for the listener: our certificate, client certificates optional but verified against our CA
    when shown (each route decides what it needs)."""
    state.need()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(state.server_cert, state.server_key)
    ctx.load_verify_locations(cafile=str(state.ca_cert))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def subject_fields(peercert: dict | None) -> tuple[str | None, str | None]:
    """(CN, OU) of a verified peer certificate as ssl.SSLSocket.getpeercert() gives it; (None, None) without one."""
    cn = ou = None
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = value
            elif key == "organizationalUnitName":
                ou = value
    return cn, ou


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def serial_hex(cert: x509.Certificate) -> str:
    return f"{cert.serial_number:x}"
