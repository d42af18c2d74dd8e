"""Client-side PostgreSQL password authentication, sans-IO: SCRAM-SHA-256 (RFC 5802/7677), md5
and cleartext, so the proxy can log in upstream with a stored secret the agent never sees.

`UpstreamAuthenticator` is the piece the relay uses: feed it each authentication message the
server sends, write back the bytes it returns, stop when `done`. `ScramClient` is the SCRAM
exchange on its own (tested against the RFC vectors).

Why the authenticator is strict by default:
- only SCRAM is allowed unless a credential opts into md5/cleartext: the agent chooses where it
  connects, so a server it controls could otherwise ask for the password in cleartext (or for an
  md5 hash it can brute-force offline) and harvest the secret the proxy exists to hide;
- the server's SCRAM signature must verify before AuthenticationOk is accepted: a server that
  skips SASLFinal has not proven it knows the password verifier (mutual authentication).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from collections.abc import Iterable

from proxy.postgres import wire

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"
DEFAULT_MAX_ITERATIONS = 1_000_000  # bounds the CPU a hostile server can make us burn


class AuthenticationError(Exception):
    """Upstream authentication cannot proceed: refused method, bad server proof, or the server's
    own error (then `code` holds its SQLSTATE)."""

    def __init__(self, message: str, code: str = "28000"):
        super().__init__(message)
        self.code = code


class ScramError(AuthenticationError):
    """The SCRAM exchange is malformed or the server failed to prove itself."""


# --------------------------------------------------------------------------------------------
# SASLprep (RFC 4013), as PostgreSQL applies it


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep of a password. Raises ValueError where the RFC prohibits the result."""
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)
    )
    norm = unicodedata.normalize("NFKC", mapped)
    if not norm:
        raise ValueError("empty after SASLprep")
    prohibited = (
        stringprep.in_table_c12, stringprep.in_table_c21, stringprep.in_table_c22, stringprep.in_table_c3,
        stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6, stringprep.in_table_c7,
        stringprep.in_table_c8, stringprep.in_table_c9, stringprep.in_table_a1,
    )
    for ch in norm:
        if any(test(ch) for test in prohibited):
            raise ValueError(f"prohibited character U+{ord(ch):04X}")
    if any(stringprep.in_table_d1(ch) for ch in norm):
        if any(stringprep.in_table_d2(ch) for ch in norm):
            raise ValueError("mixed bidirectional text")
        if not (stringprep.in_table_d1(norm[0]) and stringprep.in_table_d1(norm[-1])):
            raise ValueError("RandALCat text must start and end with RandALCat")
    return norm


def normalize_password(password: str | bytes) -> bytes:
    """The bytes PostgreSQL hashes: SASLprep'd UTF-8, or the raw bytes where SASLprep does not
    apply (pure ASCII, invalid UTF-8, prohibited characters) — the server makes the same choice
    when it stores the verifier, so both sides agree."""
    raw = password.encode("utf-8") if isinstance(password, str) else bytes(password)
    if raw.isascii():
        return raw
    try:
        return saslprep(raw.decode("utf-8")).encode("utf-8")
    except (UnicodeDecodeError, ValueError):
        return raw


# --------------------------------------------------------------------------------------------
# SCRAM


def _hmac(key: bytes, msg: bytes, hash_name: str) -> bytes:
    return hmac.new(key, msg, hash_name).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _saslname(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


def _attributes(message: str) -> list[tuple[str, str]]:
    out = []
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isalpha():
            raise ScramError(f"malformed SCRAM attribute {part[:20]!r}")
        out.append((part[0], part[2:]))
    return out


class ScramClient:
    """One SCRAM exchange from the client side.

        c = ScramClient(password)
        first = c.client_first()                 # -> SASLInitialResponse data
        final = c.client_final(server_first)     # -> SASLResponse data
        c.verify_server_final(server_final)      # raises ScramError unless the server proved itself

    channel_binding: (type, data), e.g. ("tls-server-end-point", hash_of_server_cert), to run
    SCRAM-SHA-256-PLUS; `client_supports_binding` sends the "y" flag (client could bind, server did
    not offer it) that lets a server detect a downgrade. PostgreSQL ignores the SCRAM username
    (the startup packet's user counts), so it defaults to "".
    """

    def __init__(self, password: str | bytes, *, username: str = "", nonce: str | None = None,
                 hash_name: str = "sha256", channel_binding: tuple[str, bytes] | None = None,
                 client_supports_binding: bool = False, max_iterations: int = DEFAULT_MAX_ITERATIONS):
        self._password = normalize_password(password)
        self.username = username
        self.nonce = nonce or secrets.token_urlsafe(18)
        if "," in self.nonce or not self.nonce.isprintable():
            raise ValueError("nonce must be printable and free of commas")
        self.hash_name = hash_name
        self.channel_binding = channel_binding
        self.max_iterations = max_iterations
        if channel_binding is not None:
            self.gs2_header = f"p={channel_binding[0]},,"
        elif client_supports_binding:
            self.gs2_header = "y,,"
        else:
            self.gs2_header = "n,,"
        self._client_first_bare = f"n={_saslname(username)},r={self.nonce}"
        self._server_signature: bytes | None = None
        self.state = "start"

    @property
    def mechanism(self) -> str:
        return SCRAM_SHA_256_PLUS if self.channel_binding is not None else SCRAM_SHA_256

    def client_first(self) -> bytes:
        if self.state != "start":
            raise ScramError("client-first already sent")
        self.state = "first-sent"
        return (self.gs2_header + self._client_first_bare).encode("utf-8")

    def client_final(self, server_first: bytes) -> bytes:
        """Check server-first and compute the proof."""
        if self.state != "first-sent":
            raise ScramError("unexpected server-first message")
        try:
            text = server_first.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ScramError("server-first is not UTF-8") from e
        attrs = _attributes(text)
        if attrs and attrs[0][0] == "m":
            raise ScramError("server requires an unsupported SCRAM extension")
        if len(attrs) < 3 or [k for k, _ in attrs[:3]] != ["r", "s", "i"]:
            raise ScramError("server-first must start with r=, s=, i=")
        nonce, salt_b64, iters = attrs[0][1], attrs[1][1], attrs[2][1]
        if not nonce.startswith(self.nonce) or len(nonce) <= len(self.nonce):
            raise ScramError("server nonce does not extend the client nonce")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
        except ValueError as e:
            raise ScramError("salt is not base64") from e
        if not salt:
            raise ScramError("empty salt")
        if not iters.isdigit() or not 1 <= int(iters) <= self.max_iterations:
            raise ScramError(f"iteration count {iters[:12]!r} out of range")
        salted = hashlib.pbkdf2_hmac(self.hash_name, self._password, salt, int(iters))
        client_key = _hmac(salted, b"Client Key", self.hash_name)
        stored_key = hashlib.new(self.hash_name, client_key).digest()
        cbind = self.gs2_header.encode("utf-8")
        if self.channel_binding is not None:
            cbind += self.channel_binding[1]
        without_proof = f"c={_b64(cbind)},r={nonce}"
        auth_message = f"{self._client_first_bare},{text},{without_proof}".encode()
        signature = _hmac(stored_key, auth_message, self.hash_name)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = _hmac(salted, b"Server Key", self.hash_name)
        self._server_signature = _hmac(server_key, auth_message, self.hash_name)
        self.state = "final-sent"
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def verify_server_final(self, server_final: bytes) -> None:
        if self.state != "final-sent" or self._server_signature is None:
            raise ScramError("unexpected server-final message")
        try:
            attrs = _attributes(server_final.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ScramError("server-final is not UTF-8") from e
        key, value = attrs[0]
        if key == "e":
            raise ScramError(f"server rejected SCRAM: {value}")
        if key != "v":
            raise ScramError("server-final has no verifier")
        try:
            got = base64.b64decode(value, validate=True)
        except ValueError as e:
            raise ScramError("server signature is not base64") from e
        if not hmac.compare_digest(got, self._server_signature):
            raise ScramError("server signature mismatch: the server does not know the password")
        self.state = "verified"


def tls_server_end_point(certificate_hash: bytes) -> tuple[str, bytes]:
    """Channel-binding argument for ScramClient from the hash of the server's certificate
    (RFC 5929: the certificate's signature hash, SHA-256 when that is MD5 or SHA-1)."""
    return ("tls-server-end-point", certificate_hash)


# --------------------------------------------------------------------------------------------
# md5


def md5_password(user: str, password: str | bytes, salt: bytes) -> str:
    """The md5 response: "md5" + md5(md5(password + user) + salt), hex."""
    pw = password.encode("utf-8") if isinstance(password, str) else password
    inner = hashlib.md5(pw + user.encode("utf-8")).hexdigest().encode("ascii")
    return "md5" + hashlib.md5(inner + salt).hexdigest()


# --------------------------------------------------------------------------------------------
# The authenticator the relay drives

METHODS = frozenset({"scram-sha-256", "md5", "password"})


class UpstreamAuthenticator:
    """Answers the server's authentication requests for one upstream login.

        auth = UpstreamAuthenticator("app", secret)
        for msg in reader.messages():               # backend messages after StartupMessage
            reply = auth.handle(msg)                 # bytes to send upstream, or None
            ...
            if auth.done: break                      # AuthenticationOk seen (and verified)

    allow: methods this credential may use, from {"scram-sha-256", "md5", "password"}.
    channel_binding: ("tls-server-end-point", cert hash) when the upstream link is TLS;
    require_channel_binding refuses servers that do not offer SCRAM-SHA-256-PLUS.
    Raises AuthenticationError for refused methods, bad server proofs and server errors.
    """

    def __init__(self, user: str, password: str | bytes, *, allow: Iterable[str] = ("scram-sha-256",),
                 channel_binding: tuple[str, bytes] | None = None, require_channel_binding: bool = False,
                 max_iterations: int = DEFAULT_MAX_ITERATIONS, nonce: str | None = None):
        self.user = user
        self._password = password
        self.allow = frozenset(allow)
        unknown = self.allow - METHODS
        if unknown:
            raise ValueError(f"unknown authentication methods: {sorted(unknown)}")
        self.channel_binding = channel_binding
        self.require_channel_binding = require_channel_binding
        self.max_iterations = max_iterations
        self._nonce = nonce
        self._scram: ScramClient | None = None
        self.method: str | None = None  # the method the server asked for
        self.done = False

    def handle(self, msg: wire.Message) -> bytes | None:
        """Consume one backend message of the authentication phase; returns bytes to send."""
        if self.done:
            return None
        if isinstance(msg, wire.ErrorResponse):
            raise AuthenticationError(f"server: {msg.message}", msg.code or "28000")
        if isinstance(msg, wire.AuthenticationOk):
            if self._scram is not None and self._scram.state != "verified":
                raise ScramError("server sent AuthenticationOk without completing SCRAM")
            if self.method is None:
                self.method = "trust"  # the server asked for nothing: no secret left the proxy
            self.done = True
            return None
        if isinstance(msg, wire.AuthenticationCleartextPassword):
            self._require("password")
            return wire.password_message(self._password)
        if isinstance(msg, wire.AuthenticationMD5Password):
            self._require("md5")
            return wire.password_message(md5_password(self.user, self._password, msg.salt))
        if isinstance(msg, wire.AuthenticationSASL):
            self._require("scram-sha-256")
            return self._start_scram(msg.mechanisms)
        if isinstance(msg, wire.AuthenticationSASLContinue):
            if self._scram is None:
                raise ScramError("SASLContinue before SASL")
            return wire.sasl_response(self._scram.client_final(msg.data))
        if isinstance(msg, wire.AuthenticationSASLFinal):
            if self._scram is None:
                raise ScramError("SASLFinal before SASL")
            self._scram.verify_server_final(msg.data)
            return None
        if isinstance(msg, wire.AuthenticationOther):
            raise AuthenticationError(f"unsupported authentication request (code {msg.code})")
        if isinstance(msg, wire.NoticeResponse | wire.NegotiateProtocolVersion):
            return None
        raise AuthenticationError(f"unexpected {type(msg).__name__} during authentication", "08P01")

    def _require(self, method: str) -> None:
        if self.method is not None and self.method != method:
            raise AuthenticationError(f"server switched authentication method to {method}")
        if method not in self.allow:
            raise AuthenticationError(f"server asked for {method} authentication, which this credential "
                                      f"does not allow (allowed: {', '.join(sorted(self.allow))})")
        self.method = method

    def _start_scram(self, mechanisms: tuple[str, ...]) -> bytes:
        if self._scram is not None:
            raise ScramError("server restarted SASL")
        if self.channel_binding is not None and SCRAM_SHA_256_PLUS in mechanisms:
            client = ScramClient(self._password, channel_binding=self.channel_binding, nonce=self._nonce,
                                 max_iterations=self.max_iterations)
        elif self.require_channel_binding:
            raise ScramError("server does not offer SCRAM-SHA-256-PLUS but channel binding is required")
        elif SCRAM_SHA_256 in mechanisms:
            client = ScramClient(self._password, client_supports_binding=self.channel_binding is not None,
                                 nonce=self._nonce, max_iterations=self.max_iterations)
        else:
            raise AuthenticationError(f"no supported SASL mechanism in {list(mechanisms)}")
        self._scram = client
        return wire.sasl_initial_response(client.mechanism, client.client_first())
