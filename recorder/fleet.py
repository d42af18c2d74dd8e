"""The central recorder's read API as an operator calls it: HTTPS with an operator client certificate.

Operator credentials are a directory made on the recorder machine by `interlock recorder operator
NAME --out DIR`: a client certificate and key (OU=operator, signed by the recorder's CA) and the
recorder's CA certificate, which is the only CA trusted for the server (hostname checked as usual).
Errors come out as FleetError, one sentence that says what failed and what to do, never a
traceback: the recorder unreachable, its certificate not the CA's, our certificate refused, 401/403.

    async with Fleet("https://recorder:8443", OperatorCredentials.find(Path("ops"))) as fleet:
        rows = (await fleet.get("/v1/sessions", host="h1"))["sessions"]

Endpoints (see docs/RECORDER.md and /v1 in central/): /v1/hosts, /v1/sessions, /v1/sessions/{host}/{id},
/v1/approvals, /v1/export (JSON Lines)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import aiohttp

ENV_CREDENTIALS = "INTERLOCK_OPERATOR_CREDENTIALS"
MAKE_CREDENTIALS = "make them on the recorder machine with: interlock recorder operator NAME --out DIR"
# file names an operator directory may use, in order of preference
_CERT_NAMES = ("tls.crt", "operator.crt", "cert.pem", "client.crt")
_KEY_NAMES = ("tls.key", "operator.key", "key.pem", "client.key")
_CA_NAMES = ("ca.pem", "ca.crt")


class FleetError(Exception):
    """Something an operator can fix, said in one line with the fix."""


@dataclass(frozen=True)
class OperatorCredentials:
    """Paths of the operator's client certificate and key and of the recorder's CA certificate."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def find(cls, directory: Path | str | None) -> OperatorCredentials:
        """The credentials in `directory` (None: $INTERLOCK_OPERATOR_CREDENTIALS); FleetError when absent."""
        if directory is None:
            env = os.environ.get(ENV_CREDENTIALS)
            if not env:
                raise FleetError(f"no operator credentials: pass --credentials DIR or set {ENV_CREDENTIALS} ({MAKE_CREDENTIALS})")
            directory = env
        d = Path(directory)
        if not d.is_dir():
            raise FleetError(f"operator credentials: {d} is not a directory ({MAKE_CREDENTIALS})")

        def pick(names: tuple[str, ...], what: str) -> Path:
            for n in names:
                if (d / n).is_file():
                    return d / n
            raise FleetError(f"operator credentials: no {what} in {d} (looked for {', '.join(names)}; {MAKE_CREDENTIALS})")

        return cls(pick(_CERT_NAMES, "client certificate"), pick(_KEY_NAMES, "private key"), pick(_CA_NAMES, "recorder CA"))

    def ssl_context(self) -> ssl.SSLContext:
        """TLS 1.2+ trusting only the recorder's CA, presenting the operator certificate."""
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(self.cert), str(self.key))
        except PermissionError as e:
            raise FleetError(f"operator credentials: cannot read {e.filename}: permission denied (run as the "
                             "user who owns them)") from None
        except (ssl.SSLError, OSError) as e:
            raise FleetError(f"operator credentials in {self.cert.parent} are not a usable certificate, key and CA "
                             f"({e}); {MAKE_CREDENTIALS}") from None
        return ctx


def check_server_url(url: str) -> str:
    """The recorder's base URL without a trailing slash; FleetError unless it is https://HOST[:PORT]."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise FleetError(f"--server must be the recorder's https:// URL (e.g. https://recorder.example:8443), got {url!r}")
    return url.rstrip("/")


class Fleet:
    """An operator's session with one recorder: JSON reads and streamed JSON Lines."""

    def __init__(self, server: str, credentials: OperatorCredentials, timeout: float = 60):
        self.server = check_server_url(server)
        self.credentials = credentials
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Fleet:
        ctx = self.credentials.ssl_context()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, limit=4),
            timeout=aiohttp.ClientTimeout(total=None, connect=min(self.timeout, 15), sock_read=self.timeout),
            headers={"Accept": "application/json"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    # ---- the API -------------------------------------------------------------------------------

    async def hosts(self) -> list[dict]:
        return (await self.get("/v1/hosts"))["hosts"]

    async def sessions(self, **filters: object) -> list[dict]:
        return (await self.get("/v1/sessions", **filters))["sessions"]

    async def session(self, host: str, session: str) -> dict | None:
        """{"session", "events"} or None when the recorder has no such session."""
        return await self.get(f"/v1/sessions/{quote(host, safe='')}/{quote(session, safe='')}", missing_ok=True)

    async def approvals(self, **filters: object) -> list[dict]:
        return (await self.get("/v1/approvals", **filters))["approvals"]

    async def get(self, path: str, missing_ok: bool = False, **params: object) -> dict:
        try:
            async with self._request(path, params) as resp:
                if missing_ok and resp.status == 404:
                    return None  # type: ignore[return-value]
                await self._check(resp)
                try:
                    return await resp.json(content_type=None)
                except ValueError:
                    raise FleetError(f"the recorder at {self.server} answered {path} with something that is not JSON") from None
        except aiohttp.ClientError as e:
            raise self._explain(e) from None
        except TimeoutError:
            raise FleetError(f"no answer from the recorder at {self.server} within {self.timeout:g}s") from None

    async def lines(self, path: str, **params: object) -> AsyncIterator[bytes]:
        """The answer's lines (without the newline), streamed: an export can be larger than memory."""
        try:
            async with self._request(path, params) as resp:
                await self._check(resp)
                rest = b""
                async for chunk in resp.content.iter_chunked(1 << 16):
                    rest += chunk
                    *whole, rest = rest.split(b"\n")
                    for line in whole:
                        yield line
                if rest:
                    yield rest
        except aiohttp.ClientError as e:
            raise self._explain(e) from None
        except TimeoutError:
            raise FleetError(f"the recorder at {self.server} stopped answering {path} for {self.timeout:g}s") from None

    # ---- plumbing ------------------------------------------------------------------------------

    def _request(self, path: str, params: dict[str, object]):
        if self._session is None:
            raise RuntimeError("use `async with Fleet(...)`")
        query = {k: str(v) for k, v in params.items() if v is not None and v != ""}
        return self._session.get(self.server + path, params=query)

    async def _check(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        try:
            said = (await resp.json(content_type=None)).get("error", "")
        except (ValueError, AttributeError, aiohttp.ClientError):
            said = ""
        said = f" ({said})" if said else ""
        where = f"the recorder at {self.server}"
        if resp.status == 401:
            raise FleetError(f"{where} did not accept the operator certificate {self.credentials.cert}{said}: "
                             f"use credentials from this recorder ({MAKE_CREDENTIALS})")
        if resp.status == 403:
            raise FleetError(f"{where} refused the certificate {self.credentials.cert}{said}: it is not an operator's "
                             f"(a host's certificate cannot read the fleet) or it was revoked; {MAKE_CREDENTIALS}")
        if resp.status == 404:
            raise FleetError(f"{where} has no {resp.url.path}{said}: is --server the recorder's URL?")
        if resp.status < 500:
            raise FleetError(f"{where} refused the request ({resp.status}){said}")
        raise FleetError(f"{where} failed ({resp.status}){said}; its log says why")

    def _explain(self, e: aiohttp.ClientError) -> FleetError:
        where = f"the recorder at {self.server}"
        if isinstance(e, aiohttp.ClientConnectorCertificateError):
            return FleetError(f"{where} presented a certificate that {self.credentials.ca} does not vouch for, or not for "
                              f"this name ({e.certificate_error}): check --server, and that the credentials are this recorder's")
        reason = str(getattr(e, "os_error", None) or e)
        if _tls_refused(e):
            return FleetError(f"{where} refused the TLS handshake with the operator certificate {self.credentials.cert} "
                              f"({reason}): it is not signed by this recorder's CA or was revoked; {MAKE_CREDENTIALS}")
        if isinstance(e, aiohttp.ClientSSLError):
            return FleetError(f"TLS with {where} failed ({reason}): check --server and the credentials")
        if isinstance(e, aiohttp.ClientConnectorError):
            return FleetError(f"cannot reach {where} ({reason}): is `interlock recorder serve` running there, and "
                              "the address and port right?")
        if isinstance(e, aiohttp.ServerDisconnectedError) or (
                isinstance(e, aiohttp.ClientOSError) and getattr(e, "errno", None) in (errno.ECONNRESET, errno.EPIPE)):
            # TLS 1.3: a server that rejects the client certificate does so after the handshake, by closing
            # (a reset when our request was still unread on its side)
            return FleetError(f"{where} closed the connection without answering: most likely it refused the operator "
                              f"certificate {self.credentials.cert} (not signed by its CA); {MAKE_CREDENTIALS}, or check its log")
        return FleetError(f"talking to {where} failed: {reason or type(e).__name__}")


def _tls_refused(e: BaseException) -> bool:
    """The server sent a TLS alert about our certificate (missing, unknown CA, bad, revoked)."""
    text = str(e).lower()
    return any(w in text for w in ("alert certificate", "alert unknown ca", "alert bad certificate", "certificate required",
                                   "alert handshake failure", "alert access denied", "sslv3_alert"))


def run(coro):
    """Run one CLI verb's coroutine to completion (a fresh event loop per verb)."""
    return asyncio.run(coro)


def dumps_line(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True)
