"""A first guess at the protocol from the opening bytes of either side.

Pure functions over bytes: no state, no I/O, never raises. The proxy records the guess on the
session row; the protocol handlers of the proxy core refine it."""

from __future__ import annotations

_HTTP_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ",
                 b"CONNECT ", b"TRACE ")
_PG_CODES = {196608: "postgres", 80877103: "postgres", 80877104: "postgres", 80877102: "postgres"}


def from_client(data: bytes) -> str:
    """Guess from what the client sent first; 'unknown' when nothing fits."""
    if not data:
        return "unknown"
    if data.startswith(_HTTP_METHODS):
        return "http"
    if data.startswith(b"PRI * HTTP/2.0"):
        return "http2"
    if len(data) >= 3 and data[0] == 0x16 and data[1] == 0x03:
        return "tls"
    if len(data) >= 8:
        length = int.from_bytes(data[0:4], "big")
        code = int.from_bytes(data[4:8], "big")
        if code in _PG_CODES and 8 <= length <= 10000:
            return _PG_CODES[code]
    if data[:1] == b"*" and b"\r\n" in data[:16] and data[1:2].isdigit():
        return "redis"
    if data.startswith(b"SSH-"):
        return "ssh"
    return "unknown"


def from_server(data: bytes) -> str:
    """Guess from a server that spoke first (MySQL, SSH, SMTP greet before the client)."""
    if not data:
        return "unknown"
    if data.startswith(b"SSH-"):
        return "ssh"
    if data[:4] == b"220 " or data[:4] == b"220-":
        return "smtp"
    if len(data) >= 5 and int.from_bytes(data[0:3], "little") == len(data) - 4 and data[4] == 10:
        return "mysql"
    return "unknown"
