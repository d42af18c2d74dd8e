"""The TLS handler: terminate the agent's TLS with a leaf for the name it asked for, open our own
TLS to the service (verified against the system trust store, never our CA, with the agent's SNI),
and run the HTTP handler over the plaintext in between.

Sans-IO: two ssl.SSLObjects over MemoryBIOs, fed and drained through the relay's byte seams; no
extra socket, no thread. The upstream handshake starts at once, in parallel with the agent's, so
the service's certificate is checked before any request could reach it. If that check fails the
agent's handshake still completes and its request gets a 502 naming the failure: a clear error,
instead of a reset that looks like a network fault.

Hosts whose target says `tls: passthrough` (certificate pinning, mutual TLS) are not decrypted:
the connection was judged on its SNI at connect, and its bytes are relayed as they are."""

from __future__ import annotations

import os
import ssl
from collections import OrderedDict
from pathlib import Path

from policy.engine import Destination
from proxy import naming
from proxy.handler import register
from proxy.http.handler import UNREAD_LIMIT, HttpHandler
from proxy.tls.ca import SYSTEM_BUNDLE, CertificateAuthority

ALPN = ("http/1.1",)  # what the handler speaks; an agent offering h2 is negotiated down
# A fatal unrecognized_name alert (RFC 8446 §6; RFC 6066 §3), in a plaintext record before any
# ServerHello: what an agent gets for a server_name that is no host name.
ALERT_UNRECOGNIZED_NAME = bytes([21, 3, 3, 0, 2, 2, 112])
_LDH = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_READ = 256 << 10

_upstream: dict[tuple, ssl.SSLContext] = {}
# Upstream TLS sessions by (context, name, address, port): a resumed handshake skips the
# certificate chain, already verified for the session's first connection.
_sessions: OrderedDict[tuple, ssl.SSLSession] = OrderedDict()
_SESSIONS_MAX = 1024


def _pem_blocks(text: str) -> list[str]:
    end = "-----END CERTIFICATE-----"
    out = []
    for part in text.split(end)[:-1]:
        start = part.find("-----BEGIN CERTIFICATE-----")
        if start != -1:
            out.append(part[start:] + end + "\n")
    return out


def upstream_context(ca: CertificateAuthority, trust: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """The client context for services: the trust file (default: the system store) minus our own
    CA, which install adds to the system store for the agents' sake. Rebuilt when the file changes."""
    path = Path(trust or SYSTEM_BUNDLE)
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = 0
    key = (str(path), stamp, ca.fingerprint_sha256)
    ctx = _upstream.get(key)
    if ctx is not None:
        return ctx
    ours = ca.cert_pem.decode().strip()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    blocks = [b for b in _pem_blocks(text) if b.strip() != ours]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if blocks:
        ctx.load_verify_locations(cadata="".join(blocks))
    ctx.set_alpn_protocols(list(ALPN))
    _upstream.clear()
    _upstream[key] = ctx
    return ctx


def valid_sni(name: str) -> bool:
    """A DNS host name as RFC 6066 §3 asks of server_name: ASCII letters, digits, hyphens (and the
    underscores real names carry), labels of 1..63, at most 253 in all; one trailing dot is let be."""
    name = name[:-1] if name.endswith(".") else name
    if not 0 < len(name) <= 253:
        return False
    return all(0 < len(label) <= 63 and _LDH.issuperset(label) for label in name.split("."))


def passthrough(targets: list) -> bool:
    return any(getattr(t, "tls", None) == "passthrough" for t in targets)


@register
class TlsHandler(HttpHandler):
    protocol = "tls"
    scheme = "https"

    def start(self) -> None:
        super().start()
        self.sni: str | None = self.details.get("sni") or None
        self.raw = False
        self.failed_upstream = False
        self.a_ready = self.o_ready = False
        if self.sni is not None and not valid_sni(self.sni):
            # Not a name a certificate can be minted or verified for: a TLS alert, on record.
            self.ending = True
            self.conn.event("tls-bad-sni", {"sni": self.sni[:300]})
            self.conn.to_client(ALERT_UNRECOGNIZED_NAME)
            self.conn.close("tls-error", f"server_name {self.sni[:80]!r} is not a host name (TLS alert "
                                         "unrecognized_name)", abort=False)
            return
        rec = self.conn.rec
        # By the SNI alone when it counts (proxy/naming.py): other names of the address are other
        # hosts, and an SNI that counts for nothing leaves the address's own targets.
        sni = naming.host_only(self.sni) if self.sni else ""
        targets = self.conn.proxy.policy.current.targets_for(Destination(rec.dst_addr, rec.dst_port, (sni,), rec.protocol)) \
            if sni and sni in self.conn.names() else self.conn.targets()
        self.deferred = None  # a request waiting for the certificate to say whether its Host counts
        self.raw = passthrough(targets)
        if self.raw:
            self.conn.event("tls", {"sni": self.sni, "mode": "passthrough"})
            return
        proxy = self.conn.proxy
        self.host_hint = naming.host_only(self.sni or "")
        name = self.sni or self.conn.rec.dst_addr
        self.a_in, self.a_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.a_tls = proxy.leaves.server_context(name, alpn=ALPN).wrap_bio(self.a_in, self.a_out, server_side=True)
        self.o_in, self.o_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        ctx = upstream_context(proxy.ca, getattr(proxy.config, "tls_trust", None))
        self.session_key = (id(ctx), name, rec.dst_addr, rec.dst_port)
        self.o_tls = ctx.wrap_bio(self.o_in, self.o_out, server_side=False, server_hostname=name,
                                  session=_sessions.get(self.session_key))
        self.session_saved = False
        self.a_ready = self.o_ready = False
        self.o_pending: list[bytes] = []  # plaintext for the service before its handshake is done
        self.o_pending_size = 0
        self._handshake_origin()

    # ---- agent side ---------------------------------------------------------------------------

    def on_client(self, data: bytes) -> None:
        if self.raw:
            self.conn.to_server(data)
            return
        if self.ending:
            return
        self.a_in.write(data)
        if not self.a_ready:
            try:
                self.a_tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush_agent()
                return
            except ssl.SSLError as e:
                self._flush_agent()
                self.conn.event("tls-agent-failed", {"sni": self.sni, "error": _reason(e)})
                self.ending = True
                self.conn.close("tls-error", f"agent handshake: {_reason(e)}", abort=False)
                return
            self.a_ready = True
            self.conn.event("tls", {"sni": self.sni, "alpn": self.a_tls.selected_alpn_protocol(),
                                    "version": self.a_tls.version(), "offered_alpn": self.details.get("alpn") or []})
        plain = self._drain(self.a_tls, self._flush_agent, self.a_in)
        if plain is None:
            self.on_client_eof()
        elif plain:
            self.agent_plain(plain)
        self._flush_agent()

    def send_agent(self, data: bytes) -> None:
        if data and not self.raw:
            self.a_tls.write(data)
            self._flush_agent()

    def _flush_agent(self) -> None:
        out = self.a_out.read()
        if out:
            self.conn.to_client(out)

    # ---- service side -------------------------------------------------------------------------

    def _handshake_origin(self) -> None:
        try:
            self.o_tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_origin()
            return
        except ssl.SSLCertVerificationError as e:
            self._flush_origin()
            self._upstream_failed(f"the service's certificate for {self.o_tls.server_hostname} failed verification: "
                                  f"{e.verify_message or _reason(e)}")
            return
        except ssl.SSLError as e:
            self._flush_origin()
            self._upstream_failed(f"TLS handshake with the service failed: {_reason(e)}")
            return
        self.o_ready = True
        self._flush_origin()
        if self.host_hint:
            # Verified with check_hostname for the SNI: the certificate proves it.
            self.conn.proven.add(self.host_hint)
            if self.conn.unproven_sni == self.host_hint:
                self.conn.event("name-proven", {"name": self.host_hint, "address": self.conn.rec.dst_addr,
                                                "by": "upstream certificate"})
        self._judge_deferred()
        pending, self.o_pending = self.o_pending, []
        for chunk in pending:
            self.send_origin(chunk)
        if self.o_pending_size > UNREAD_LIMIT:
            self.conn.resume_client()
        self.o_pending_size = 0

    def _upstream_failed(self, detail: str) -> None:
        self.failed_upstream = True
        self.conn.event("tls-upstream-failed", {"sni": self.sni, "error": detail[:300]})
        self.origin_failed(detail)
        self._judge_deferred()

    # ---- which names count (proxy/naming.py) --------------------------------------------------

    def name_counts(self, name: str) -> bool:
        """The SNI counts (no request byte reaches the service unless the verified handshake for
        it succeeds); another Host when the agent resolved it here or the certificate covers it."""
        if name == self.host_hint or naming.counts(self.conn, name):
            return True
        return self.o_ready and naming.certificate_covers(self.o_tls.getpeercert(), name)

    def _judge(self, req) -> None:
        host = naming.host_only(req.head.host or "")
        if (not self.raw and not self.o_ready and not self.failed_upstream and host
                and not self.name_counts(host)):
            self.busy = True  # judged once the service's certificate is known
            self.deferred = req
            return
        super()._judge(req)

    def _judge_deferred(self) -> None:
        req, self.deferred = self.deferred, None
        if req is not None and not self.ending:
            self._batched(super()._judge, req)

    def keep_without_origin(self) -> bool:
        # After a failed upstream handshake the agent's first request is still to come: it gets the 502.
        return self.failed_upstream and not self.ending and self.served == 0

    def on_server(self, data: bytes) -> None:
        if self.raw:
            self.conn.to_client(data)
            return
        if self.ending or self.failed_upstream:
            return
        self.o_in.write(data)
        if not self.o_ready:
            self._handshake_origin()
            if not self.o_ready:
                return
        plain = self._drain(self.o_tls, self._flush_origin, self.o_in)
        if plain and not self.session_saved:
            self._save_session()
        if plain:
            self.origin_plain(plain)
        if plain is None and not self.ending:
            self.origin_plain(b"")

    def _save_session(self) -> None:
        """Keep the service's session for the next connection, once per connection, when its first
        response bytes arrive: TLS 1.3 tickets come after the handshake and before those bytes.
        Reading SSLObject.session copies the session through DER (peer certificate included,
        ~0.3 ms), so a connection that resumed the session already kept is not read again."""
        self.session_saved = True
        if self.o_tls.session_reused and self.session_key in _sessions:
            _sessions.move_to_end(self.session_key)
            return
        session = self.o_tls.session
        if session is None or not session.has_ticket:
            return
        _sessions[self.session_key] = session
        _sessions.move_to_end(self.session_key)
        while len(_sessions) > _SESSIONS_MAX:
            _sessions.popitem(last=False)

    def send_origin(self, data: bytes) -> None:
        if not data or self.raw or self.origin_gone is not None:
            return
        if not self.o_ready:
            self.o_pending.append(data)
            self.o_pending_size += len(data)
            if self.o_pending_size > UNREAD_LIMIT:
                self.conn.pause_client()  # an upload allowed before the service's handshake ended
            return
        self.o_tls.write(data)
        self._flush_origin()

    def _flush_origin(self) -> None:
        out = self.o_out.read()
        if out and self.origin_gone is None:
            self.conn.to_server(out)

    # ---- both ---------------------------------------------------------------------------------

    @staticmethod
    def _drain(tls: ssl.SSLObject, flush, incoming: ssl.MemoryBIO) -> bytes | None:
        """All plaintext available now; None when the peer sent close_notify."""
        parts = []
        while True:
            try:
                chunk = tls.read(_READ)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                return b"".join(parts) or None
            except ssl.SSLError:
                return b"".join(parts) or None
            if not chunk:
                return b"".join(parts) or None
            parts.append(chunk)
            if not incoming.pending and not tls.pending():
                break  # all read: no SSLWantReadError raised and caught per read
        flush()
        return b"".join(parts)

    def on_client_eof(self) -> bool:
        if self.raw:
            self.conn.server_eof()
            return True
        return super().on_client_eof()

    def on_server_eof(self) -> bool:
        if self.raw:
            self.conn.client_eof()
            return True
        if self.failed_upstream:
            return True
        return super().on_server_eof()

    def on_server_lost(self) -> bool:
        return False if self.raw else super().on_server_lost()

    def flush_close(self) -> None:
        if not self.raw and self.a_ready:
            try:
                self.a_tls.unwrap()
            except ssl.SSLError:
                pass
            self._flush_agent()


def _reason(e: ssl.SSLError) -> str:
    return (getattr(e, "reason", None) or str(e))[:200]
