"""Detectors for server-first protocols, run on the server's greeting when the client stayed silent.

MySQL/MariaDB, SMTP, FTP, POP3, IMAP, VNC and SSH servers speak first; their clients wait. Same
contract as classifier.client: (data, final) → Verdict, NEED_MORE or None (here None is not
necessarily final: servers are re-judged on every read)."""

from __future__ import annotations

from typing import Any

from .client import Detector, _printable_line, _text, ssh_banner
from .verdict import NEED_MORE, TCP, NeedMore, Verdict

_MAX_GREETING_LINE = 1024


def _first_line(data: bytes, final: bool) -> bytes | NeedMore | None:
    """The first text line of a greeting, NEED_MORE while it is still arriving."""
    eol = data.find(b"\n", 0, _MAX_GREETING_LINE)
    if eol == -1:
        if final or len(data) >= _MAX_GREETING_LINE:
            return data[:_MAX_GREETING_LINE] if _printable_line(data[:_MAX_GREETING_LINE]) else None
        return NEED_MORE if _printable_line(data) else None
    line = data[:eol].rstrip(b"\r")
    return line if _printable_line(line) else None


def detect_ssh_server(data: bytes, final: bool) -> Verdict | NeedMore | None:
    """A server may send other lines before its SSH- identification (RFC 4253 §4.2)."""
    pos = 0
    for _ in range(16):
        rest = data[pos:]
        if rest.startswith(b"SSH-"):
            v = ssh_banner(rest[:256], final, "server")
            if isinstance(v, Verdict) and pos:
                return Verdict(v.protocol, min(v.confidence, 0.9), v.details, v.side)
            return v
        if b"SSH-".startswith(rest) and (pos == 0 or rest):
            return None if final else NEED_MORE
        eol = data.find(b"\n", pos, pos + _MAX_GREETING_LINE)
        if eol == -1 or not _printable_line(data[pos:eol]):
            return None
        pos = eol + 1
    return None


def detect_smtp_family(data: bytes, final: bool) -> Verdict | NeedMore | None:
    """Text greetings: `220` for SMTP (and FTP), `+OK` for POP3, `* OK` for IMAP, `RFB` for VNC.

    Only SMTP has a label of its own (it is in LABELS, which the proxy's policy knows); the others
    are "tcp" with the recognised service in details, so no label appears that policy never saw."""
    for prefix in (b"220", b"+OK", b"* OK", b"* PREAUTH", b"* BYE", b"RFB "):
        if data.startswith(prefix):
            break
        if not final and prefix.startswith(data):
            return NEED_MORE
    else:
        return None
    line = _first_line(data, final)
    if line is None or isinstance(line, NeedMore):
        return line
    upper = line.upper()
    details: dict[str, Any] = {"greeting": _text(line)}
    if line.startswith(b"220"):
        if line[3:4] not in (b" ", b"-", b""):
            return None
        if b"FTP" in upper and b"SMTP" not in upper:
            return Verdict(TCP, 0.9, {**details, "service": "ftp"}, "server")
        return Verdict("smtp", 0.95 if b"SMTP" in upper else 0.7, details, "server")
    if line.startswith(b"+OK"):
        return Verdict(TCP, 0.9, {**details, "service": "pop3"}, "server")
    if line.startswith(b"RFB "):
        ok = len(line) == 11 and line[4:7].isdigit() and line[7:8] == b"." and line[8:11].isdigit()
        return Verdict(TCP, 1.0, {**details, "service": "vnc"}, "server") if ok else None
    return Verdict(TCP, 0.95 if b"IMAP" in upper else 0.85, {**details, "service": "imap"}, "server")


def detect_mysql(data: bytes, final: bool) -> Verdict | NeedMore | None:
    """Initial Handshake packet (protocol 10) or an early ERR packet, in a sequence-0 packet."""
    n = len(data)
    if n >= 3 and not 5 <= int.from_bytes(data[0:3], "little") <= 4096:
        return None
    if n >= 4 and data[3] != 0:
        return None
    if n >= 5 and data[4] not in (10, 9, 0xFF):
        return None
    if n < 5:
        return None if final else NEED_MORE
    length = int.from_bytes(data[0:3], "little")
    payload = data[4:4 + length]
    if payload[0] == 0xFF:
        if len(payload) < 3:
            return _mysql_wait({"error": True}, final)
        details: dict[str, Any] = {"error": int.from_bytes(payload[1:3], "little")}
        if len(payload) < length:
            return _mysql_wait(details, final)
        message = payload[3:]
        if message.startswith(b"#"):
            message = message[6:]  # SQL state marker and code
        details["message"] = _text(message)
        return Verdict("mysql", 0.8 if _printable_line(message) else 0.6, details, "server")
    nul = payload.find(b"\x00", 1, 80)
    if nul == -1:
        if len(payload) >= 80 or not _printable_line(payload[1:]):
            return None
        return _mysql_wait({"protocol_version": payload[0]}, final)
    version = payload[1:nul]
    if not version or not _printable_line(version):
        return None
    details = {"protocol_version": payload[0], "server_version": _text(version, 80)}
    if "mariadb" in details["server_version"].lower():
        details["mariadb"] = True
    fixed = nul + 1 + 4 + 8  # thread id, first scramble part
    if len(payload) < fixed + 1:
        return _mysql_wait(details, final)
    if payload[0] == 10 and payload[fixed] != 0:  # filler byte after the scramble
        return None
    return Verdict("mysql", 1.0, details, "server")


def _mysql_wait(details: dict[str, Any], final: bool) -> Verdict | NeedMore:
    if final:
        return Verdict("mysql", 0.6, {**details, "truncated": True}, "server")
    return NEED_MORE


SERVER_DETECTORS: tuple[Detector, ...] = (detect_ssh_server, detect_mysql, detect_smtp_family)
