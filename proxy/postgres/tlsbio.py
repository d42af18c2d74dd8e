"""TLS over memory buffers, sans-IO: the PostgreSQL relay's encryption toward the agent and the server.

PostgreSQL starts TLS in the middle of a plaintext conversation (SSLRequest, then 'S'), on a
socket the relay already owns and reads through asyncio Protocols; `ssl.SSLObject` with two
`MemoryBIO`s lets the same callbacks carry ciphertext, with no second socket and no thread.

    tls = TlsPipe.server(context)          # or TlsPipe.client(context, server_hostname)
    plain = tls.receive(ciphertext)        # decrypted application bytes (b"" during the handshake)
    send(tls.outgoing())                   # handshake records, alerts, and what encrypt() made
    send(tls.encrypt(plain_reply))

Records carry at most `RECORD_PLAINTEXT` (8 KB) of application data, as PostgreSQL's own do:
libpq reads into an 8 KB buffer, and a larger record leaves decrypted bytes inside the client's
OpenSSL while its socket is idle, where a client that waits on the socket (psycopg) never looks.

Errors (bad handshake, bad records) raise ssl.SSLError: the caller closes the connection.
"""

from __future__ import annotations

import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes

RECORD_PLAINTEXT = 8192  # bytes of application data per TLS record (PostgreSQL's PQ buffer size)


class TlsPipe:
    __slots__ = ("obj", "_in", "_out", "handshaken", "closed")

    def __init__(self, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO):
        self.obj, self._in, self._out = obj, incoming, outgoing
        self.handshaken = False
        self.closed = False  # the peer sent close_notify

    @classmethod
    def server(cls, context: ssl.SSLContext) -> TlsPipe:
        i, o = ssl.MemoryBIO(), ssl.MemoryBIO()
        return cls(context.wrap_bio(i, o, server_side=True), i, o)

    @classmethod
    def client(cls, context: ssl.SSLContext, server_hostname: str | None = None) -> TlsPipe:
        i, o = ssl.MemoryBIO(), ssl.MemoryBIO()
        pipe = cls(context.wrap_bio(i, o, server_side=False, server_hostname=server_hostname), i, o)
        pipe._handshake()  # the client speaks first: ClientHello is in outgoing() now
        return pipe

    def _handshake(self) -> bool:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        self.handshaken = True
        return True

    def receive(self, data: bytes | memoryview) -> bytes:
        """Feed ciphertext; return whatever application data it completes."""
        if data:
            self._in.write(data)
        if not self.handshaken and not self._handshake():
            return b""
        chunks = []
        while True:
            try:
                chunk = self.obj.read(262144)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.closed = True
                break
            if not chunk:  # close_notify (SSLObject reports it as an empty read)
                self.closed = True
                break
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def encrypt(self, data: bytes | memoryview) -> bytes:
        """Application bytes → TLS records of at most RECORD_PLAINTEXT bytes each (plus anything
        else pending for the peer). One write makes one record."""
        n = len(data)
        if n <= RECORD_PLAINTEXT:
            if n:
                self.obj.write(data)
        else:
            mv = memoryview(data)
            write = self.obj.write
            for i in range(0, n, RECORD_PLAINTEXT):
                write(mv[i:i + RECORD_PLAINTEXT])
        return self._out.read()

    def shutdown(self) -> bytes:
        """close_notify for the peer (we close after it without waiting for theirs)."""
        try:
            self.obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass
        return self._out.read()

    def outgoing(self) -> bytes:
        return self._out.read()

    def peer_certificate(self) -> bytes | None:
        return self.obj.getpeercert(binary_form=True)


def server_end_point_hash(der: bytes) -> bytes:
    """RFC 5929 tls-server-end-point: the certificate hashed with its signature's hash
    (SHA-256 when that is MD5 or SHA-1), for SCRAM-SHA-256-PLUS channel binding."""
    cert = x509.load_der_x509_certificate(der)
    algo = cert.signature_hash_algorithm
    if algo is None or isinstance(algo, hashes.MD5 | hashes.SHA1):
        algo = hashes.SHA256()
    h = hashes.Hash(algo)
    h.update(der)
    return h.finalize()


def client_context() -> ssl.SSLContext:
    """Toward the server: encryption on the wire like libpq's sslmode=require (no certificate
    verification: lab and self-signed servers are the norm). What stops a man in the middle is
    SCRAM-SHA-256-PLUS channel binding, which the proxy uses whenever it logs in itself."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
