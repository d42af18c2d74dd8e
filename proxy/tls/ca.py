"""A private certificate authority that mints short-lived leaf certificates on demand.

Why short-lived leaves and a cache: the proxy meets the same few hosts again and again, so minting
once per name and keeping the result in an LRU makes handshakes cheap, while a validity of a day
or so means a leaked leaf key is worth little. All leaves share one key pair per minter, generated
in memory and never written to disk, because generating a key per host costs more than it buys.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import os
import secrets
import ssl
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
KeyType = Literal["ec", "rsa"]

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"

# Clocks on agents' machines drift; back-date every certificate a little so a fresh leaf is valid.
_BACKDATE = dt.timedelta(hours=1)


class CAError(Exception):
    """The CA files are missing, unreadable, mismatched or not a CA."""


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret so that it is never readable by others, not even for an instant."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@dataclass(frozen=True)
class CertificateAuthority:
    """Our root: a self-signed CA certificate and its private key."""

    cert: x509.Certificate
    key: PrivateKey

    @classmethod
    def create(cls, common_name: str = "Interlock Interception CA", *, key_type: KeyType = "ec",
               valid_days: int = 3650) -> CertificateAuthority:
        key = _new_key(key_type)
        name = x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Interlock"),
        ])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + dt.timedelta(days=valid_days))
            # pathlen 0: this CA signs leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> CertificateAuthority:
        try:
            cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
            key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        except (OSError, ValueError) as e:
            raise CAError(f"cannot load CA from {cert_path} / {key_path}: {e}") from e
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise CAError("CA key must be EC or RSA")
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        if (key.public_key().public_bytes(serialization.Encoding.DER, pub)
                != cert.public_key().public_bytes(serialization.Encoding.DER, pub)):
            raise CAError("CA key does not match CA certificate")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise CAError("certificate is not a CA")
        return cls(cert, key)

    def save(self, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> None:
        _write_private(Path(key_path), _key_pem(self.key))
        _write_public(Path(cert_path), self.cert_pem)

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str], *, key_type: KeyType = "ec",
                       common_name: str = "Interlock Interception CA") -> CertificateAuthority:
        """The CA of an install: the one on disk if there is one, else a new one written there."""
        d = Path(directory)
        cert_path, key_path = d / CA_CERT_FILE, d / CA_KEY_FILE
        if cert_path.exists() or key_path.exists():
            return cls.load(cert_path, key_path)
        d.mkdir(parents=True, exist_ok=True)
        ca = cls.create(common_name, key_type=key_type)
        ca.save(cert_path, key_path)
        return ca

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @functools.cached_property  # the upstream context's cache key asks for it on every connection
    def fingerprint_sha256(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class Leaf:
    """One minted server certificate. chain_pem is leaf then CA, what a TLS server presents."""

    host: str
    cert: x509.Certificate
    cert_pem: bytes
    key_pem: bytes
    chain_pem: bytes

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc


def normalize_host(host: str) -> str:
    """Canonical form of an SNI name or IP literal: lower case, no trailing dot, no IPv6 brackets."""
    h = host.strip().rstrip(".").lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if not h:
        raise ValueError("empty host name")
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        pass
    try:
        h.encode("ascii")
    except UnicodeEncodeError:
        h = h.encode("idna").decode("ascii")
    if any(c in h for c in " /\\\x00") or len(h) > 253:
        raise ValueError(f"not a host name: {host!r}")
    return h


class LeafMinter:
    """Mints and caches leaf certificates (and optionally SSL contexts) per host.

    Thread-safe: the asyncio proxy may call it from an sni_callback, which runs in the event loop
    thread, while other code warms it from a worker thread.
    """

    def __init__(self, ca: CertificateAuthority, *, validity: dt.timedelta = dt.timedelta(days=1),
                 cache_size: int = 512, key_type: KeyType = "ec",
                 renew_before: dt.timedelta = dt.timedelta(hours=1)) -> None:
        if validity <= renew_before:
            raise ValueError("validity must exceed renew_before")
        self.ca = ca
        self.validity = validity
        self.cache_size = cache_size
        self.renew_before = renew_before
        self._key = _new_key(key_type)
        self._key_pem = _key_pem(self._key)
        self._leaves: OrderedDict[str, Leaf] = OrderedDict()
        self._contexts: OrderedDict[str, tuple[dt.datetime, ssl.SSLContext]] = OrderedDict()
        self._lock = threading.Lock()
        self.minted = 0  # how many certificates were actually signed, for tests and metrics

    def leaf(self, host: str, *, now: dt.datetime | None = None) -> Leaf:
        """The certificate for host (DNS name or IP literal), minted on first use or near expiry."""
        name = normalize_host(host)
        now = now or _now()
        with self._lock:
            cached = self._leaves.get(name)
            if cached is not None and cached.not_after - self.renew_before > now:
                self._leaves.move_to_end(name)
                return cached
        leaf = self._mint(name, now)
        with self._lock:
            self._leaves[name] = leaf
            self._leaves.move_to_end(name)
            while len(self._leaves) > self.cache_size:
                self._leaves.popitem(last=False)
        return leaf

    def _mint(self, name: str, now: dt.datetime) -> Leaf:
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            ip = None
        san: x509.GeneralName = x509.IPAddress(ip) if ip is not None else x509.DNSName(name)
        # CN is capped at 64 characters by X.509; clients check the SAN anyway.
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])
        ca_ski = self.ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        not_after = min(now + self.validity, self.ca.cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.ca.cert.subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=isinstance(self._key, rsa.RSAPrivateKey),
                                         data_encipherment=False, key_agreement=False,
                                         key_cert_sign=False, crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(self.ca.key, hashes.SHA256())
        )
        self.minted += 1
        pem = cert.public_bytes(serialization.Encoding.PEM)
        return Leaf(name, cert, pem, self._key_pem, pem + self.ca.cert_pem)

    def server_context(self, host: str, *, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
        """A server-side SSLContext presenting host's leaf; assign it to ssl_object.context in an
        sni_callback. ssl only loads certificates from files, so the PEMs pass through a private
        temporary directory that is removed at once."""
        name = normalize_host(host)
        now = _now()
        with self._lock:
            hit = self._contexts.get(name)
            if hit is not None and hit[0] - self.renew_before > now:
                self._contexts.move_to_end(name)
                return hit[1]
        leaf = self.leaf(name, now=now)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        # One TLS 1.3 ticket per full handshake, not OpenSSL's two: each costs an encryption
        # (~40 us) and an agent that resumes uses one per connection. Resumption works across
        # connections because this context, and so its ticket key, is cached per name.
        ctx.num_tickets = 1
        with tempfile.TemporaryDirectory(prefix="interlock-leaf-") as tmp:
            chain, key = Path(tmp) / "chain.pem", Path(tmp) / "key.pem"
            _write_private(key, leaf.key_pem)
            chain.write_bytes(leaf.chain_pem)
            ctx.load_cert_chain(chain, key)
        with self._lock:
            self._contexts[name] = (leaf.not_after, ctx)
            while len(self._contexts) > self.cache_size:
                self._contexts.popitem(last=False)
        return ctx

    def __len__(self) -> int:
        return len(self._leaves)


def write_bundle(ca: CertificateAuthority, dest: str | os.PathLike[str], *,
                 system_bundle: str | os.PathLike[str] | None = SYSTEM_BUNDLE) -> Path:
    """Write system CAs + our CA to dest, for agents pointed at it (SSL_CERT_FILE, AWS_CA_BUNDLE,
    REQUESTS_CA_BUNDLE, NODE_EXTRA_CA_CERTS takes ours alone). The agent keeps trusting the real
    world for hosts the proxy does not intercept. Missing system bundle: ours alone."""
    parts: list[bytes] = []
    if system_bundle is not None:
        try:
            system = Path(system_bundle).read_bytes()
        except FileNotFoundError:
            system = b""
        if system:
            parts.append(system if system.endswith(b"\n") else system + b"\n")
    parts.append(b"# Interlock interception CA, sha256 " + ca.fingerprint_sha256.encode() + b"\n")
    parts.append(ca.cert_pem)
    path = Path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_public(path, b"".join(parts))
    return path
