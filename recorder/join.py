"""Joining this host to a central recorder (`interlock join --server URL --token T`), and the host
files the shipper reads afterwards.

The token (`il1.<id>.<secret>.<ca_sha256 hex>`, made by `interlock recorder token` on the
recorder) carries the SHA-256 of the recorder's CA certificate (DER), so the CA fetched over an
unauthenticated first connection is checked before anything is sent: from then on every
connection verifies the server against that CA and the host presents its own client certificate
(mTLS). Files, all root 0600 in `<state_dir>/recorder/` (the directory 0700):

    host.json   {"host_id", "server", "ca_sha256", "name"}
    ca.pem      the recorder's CA
    tls.key     the host's TLS key (EC P-256); tls.crt its certificate, CN = host_id
    signing.key the host's Ed25519 checkpoint key: only its public half is ever sent

The files are written to a temporary directory that is renamed into place once the server has
answered, so a failed join leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from recorder import records

TOKEN = re.compile(r"^il1\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([0-9a-f]{64})$")
TIMEOUT = 30.0  # seconds for each request of the join


class JoinError(Exception):
    """Why the join failed, in words an operator can act on."""


def recorder_dir(state_dir: Path) -> Path:
    return state_dir / "recorder"


@dataclass(frozen=True)
class HostFiles:
    """The joined host's identity and the paths of its keys (`load` checks they are all there)."""

    dir: Path
    host_id: str
    server: str
    ca_sha256: str
    name: str = ""

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def tls_key(self) -> Path:
        return self.dir / "tls.key"

    @property
    def tls_crt(self) -> Path:
        return self.dir / "tls.crt"

    @property
    def signing_key(self) -> Path:
        return self.dir / "signing.key"

    @classmethod
    def load(cls, state_dir: Path) -> HostFiles:
        """Raises JoinError naming `interlock join` when the host has not joined (or a file is missing)."""
        d = recorder_dir(state_dir)
        try:
            info = json.loads((d / "host.json").read_text())
            files = cls(d, str(info["host_id"]), str(info["server"]), str(info["ca_sha256"]), str(info.get("name", "")))
        except FileNotFoundError:
            raise JoinError(f"this host has not joined a recorder (no {d / 'host.json'})") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise JoinError(f"{d / 'host.json'} is unreadable ({e}): join again") from None
        missing = [p.name for p in (files.ca, files.tls_key, files.tls_crt, files.signing_key) if not p.is_file()]
        if missing:
            raise JoinError(f"{d} lacks {', '.join(missing)}: join again")
        return files

    def client_context(self) -> ssl.SSLContext:
        """TLS that trusts only the recorder's CA and presents this host's certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        ctx.load_cert_chain(str(self.tls_crt), str(self.tls_key))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


def same_server(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def parse_token(token: str) -> tuple[str, str]:
    """(token id, CA SHA-256 hex) of an enrolment token; JoinError when it is not one."""
    m = TOKEN.match(token.strip())
    if not m:
        raise JoinError("the token is not an Interlock enrolment token (il1.<id>.<secret>.<ca sha256>): "
                        "copy it whole from `interlock recorder token` on the recorder")
    return m.group(1), m.group(3)


def check_server_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise JoinError(f"--server must be an https:// URL of the recorder, got {url!r}")
    return url.rstrip("/")


def ca_fingerprint(pem: bytes) -> str:
    """SHA-256 of the first certificate's DER encoding, hex; JoinError when `pem` is no certificate."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise JoinError("the server's /v1/ca is not a PEM certificate: is --server the Interlock recorder?") from None
    return cert.fingerprint(hashes.SHA256()).hex()


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


async def _fetch_ca(server: str) -> bytes:
    insecure = ssl.create_default_context()
    insecure.check_hostname = False  # not trusted yet: its hash is checked against the token instead
    insecure.verify_mode = ssl.CERT_NONE
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http:
        async with http.get(f"{server}/v1/ca", ssl=insecure) as resp:
            if resp.status != 200:
                raise JoinError(f"{server}/v1/ca answered HTTP {resp.status}: is --server the Interlock recorder?")
            return await resp.read()


async def _post_join(server: str, ca: Path, body: dict) -> dict:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http:
        async with http.post(f"{server}/v1/join", json=body, ssl=ctx) as resp:
            text = await resp.text()
            try:
                answer = json.loads(text)
            except ValueError:
                answer = {"error": text[:200]}
            if resp.status == 401:
                raise JoinError(f"the recorder refused the token ({answer.get('error', 'invalid')}): tokens are single "
                                "use and expire; make a new one with `interlock recorder token` on the recorder")
            if resp.status != 200:
                raise JoinError(f"the recorder refused the join: HTTP {resp.status}: {answer.get('error', text[:200])}")
            return answer


def join(state_dir: Path, server: str, token: str, name: str | None = None) -> HostFiles:
    """Join the recorder at `server` with an enrolment token and write the host files.

    Raises JoinError (already joined, bad token, CA hash mismatch, refused, unreachable)."""
    server = check_server_url(server)
    _, ca_sha = parse_token(token)
    final = recorder_dir(state_dir)
    if (final / "host.json").exists():
        try:
            have = HostFiles.load(state_dir)
            who = f"{have.server} as host {have.host_id}"
        except JoinError:
            who = "a recorder"
        raise JoinError(f"this host has already joined {who} ({final}); its chain continues under that id. "
                        f"To start over as a new host, move {final} away and join again")
    name = name or socket.gethostname()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = Path(tempfile.mkdtemp(prefix=".recorder-joining-", dir=state_dir))
    try:
        try:
            ca_pem = asyncio.run(_fetch_ca(server))
            if ca_fingerprint(ca_pem) != ca_sha:
                raise JoinError(f"the CA certificate {server} presents does not match the token (SHA-256 "
                                f"{ca_fingerprint(ca_pem)}, token {ca_sha}): wrong --server, or someone is in between")
            _write(tmp / "ca.pem", ca_pem)
            tls_key = ec.generate_private_key(ec.SECP256R1())
            csr = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
                   .sign(tls_key, hashes.SHA256()))
            signing = records.new_signing_key(tmp / "signing.key")
            answer = asyncio.run(_post_join(server, tmp / "ca.pem", {
                "token": token.strip(), "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
                "signing_key": records.public_key_hex(signing), "name": name}))
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise JoinError(f"cannot reach the recorder at {server}: {e or type(e).__name__}") from None
        try:
            host_id, cert = str(answer["host_id"]), str(answer["cert"]).encode()
            x509.load_pem_x509_certificate(cert)
        except (KeyError, TypeError, ValueError):
            raise JoinError(f"the recorder's answer to the join is not {{host_id, cert, ca}}: {str(answer)[:200]}") from None
        _write(tmp / "tls.key", tls_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
        _write(tmp / "tls.crt", cert)
        files = HostFiles(final, host_id, server, ca_sha, name)
        _write(tmp / "host.json", json.dumps({"host_id": host_id, "server": server, "ca_sha256": ca_sha,
                                              "name": name}, indent=1).encode())
        os.chmod(tmp, 0o700)
        if final.exists():  # an empty or half-written leftover (no host.json): replaced
            shutil.rmtree(final)
        tmp.rename(final)
        return files
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
