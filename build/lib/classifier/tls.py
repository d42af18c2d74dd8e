"""TLS ClientHello recognition and parsing (RFC 8446 §4.1.2, RFC 6066 SNI, RFC 7301 ALPN).

The hello may be fragmented over several TLS records (RFC 8446 §5.1 allows it, and post-quantum key
shares make it larger than one TCP segment), so the handshake message is rebuilt from the records
before it is parsed. Only the cleartext hello is read: SNI and ALPN are what policy needs."""

from __future__ import annotations

from typing import Any

from .verdict import NEED_MORE, NeedMore, Verdict

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_MAX_RECORD = 2**14 + 2048  # TLSCiphertext bound; a plaintext hello record is at most 2**14
_MAX_HELLO = 2**16  # real hellos are a few KiB; larger is treated as "TLS, details unknown"
_MAX_RECORDS = 64  # OpenSSL's smallest fragment (512) splits even a 16 KiB hello into 32; more is hostile

_EXT_SNI = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
_EXT_ECH = 0xFE0D

_VERSIONS = {0x0300: "SSL3.0", 0x0301: "TLS1.0", 0x0302: "TLS1.1", 0x0303: "TLS1.2", 0x0304: "TLS1.3"}


def _is_grease(v: int) -> bool:
    """RFC 8701 reserved values (0x?A?A with equal bytes) carry no meaning: skip them."""
    return (v & 0x0F0F) == 0x0A0A and (v >> 8) == (v & 0xFF)


def _version_name(v: int) -> str:
    return _VERSIONS.get(v, f"0x{v:04x}")


def _text(raw: bytes) -> str:
    """Names from the wire are attacker-chosen: decode without failing, keep them printable."""
    return raw.decode("ascii", "backslashreplace")


def detect_client_hello(data: bytes, final: bool) -> Verdict | NeedMore | None:
    """Is `data` the start of a TLS connection? Parses the ClientHello when it is all there."""
    if not data:
        return None
    if data[0] == _HANDSHAKE:
        return _from_records(data, final)
    if data[0] & 0x80:
        return _sslv2_hello(data, final)
    return None


def _header_ok(data: bytes, off: int) -> bool | None:
    """True/False for a plausible TLS record header at `off`; None when it is cut short."""
    avail = len(data) - off
    if avail >= 2 and data[off + 1] != 3:
        return False
    if avail >= 3 and data[off + 2] > 4:
        return False
    if avail < 5:
        return None
    length = int.from_bytes(data[off + 3:off + 5], "big")
    return 0 < length <= _MAX_RECORD


def _from_records(data: bytes, final: bool) -> Verdict | NeedMore | None:
    ok = _header_ok(data, 0)
    if ok is False:
        return None
    if ok is None:
        if final and len(data) >= 3:
            return Verdict("tls", 0.5, {"truncated": True})
        return None if final else NEED_MORE
    hs = bytearray()
    off = 0
    records = 0
    stuck = False  # bytes follow that cannot continue a handshake: not a hello we can read
    while off < len(data) and not _complete(hs):
        ok = _header_ok(data, off) if data[off] == _HANDSHAKE else False
        if ok is None:
            break
        if ok is False:
            stuck = True
            break
        length = int.from_bytes(data[off + 3:off + 5], "big")
        hs += data[off + 5:off + 5 + length]
        records += 1
        off += 5 + length
        if records >= _MAX_RECORDS and not _complete(hs):
            # Re-assembling thousands of tiny records on every read would cost O(n²): it is TLS
            # (a handshake record opening a ClientHello), say so without the details.
            return Verdict("tls", 0.8, {"fragmented": True, "records": records}) if hs[:1] == b"\x01" else None
    if hs and hs[0] != _CLIENT_HELLO:
        return None
    if len(hs) >= 4:
        hlen = int.from_bytes(hs[1:4], "big")
        if hlen < 38:  # version + random + session id length + ... cannot fit
            return None
        if len(hs) >= 4 + hlen:
            details = parse_client_hello(bytes(hs[4:4 + hlen]))
            if details is None:
                return Verdict("tls", 0.7, {"malformed": True, "records": records})
            details["records"] = records
            return Verdict("tls", 1.0, details)
        if hlen > _MAX_HELLO:
            return Verdict("tls", 0.8, {"truncated": True, "records": records})
    if stuck:
        return Verdict("tls", 0.6, {"malformed": True, "records": records}) if hs else None
    if final:
        return Verdict("tls", 0.8, {"truncated": True, "records": records})
    return NEED_MORE


def _complete(hs: bytearray) -> bool:
    return len(hs) >= 4 and len(hs) >= 4 + int.from_bytes(hs[1:4], "big")


def _sslv2_hello(data: bytes, final: bool) -> Verdict | NeedMore | None:
    """SSLv2-framed ClientHello (RFC 5246 appendix E.2) still sent by a few legacy stacks."""
    if len(data) >= 3 and data[2] != 1:
        return None
    if len(data) >= 5:
        version = int.from_bytes(data[3:5], "big")
        if version != 0x0002 and not 0x0300 <= version <= 0x0304:
            return None
        length = ((data[0] & 0x7F) << 8) | data[1]
        if length < 9:
            return None
        return Verdict("tls", 0.9, {"sslv2_compat": True, "legacy_version": _version_name(version)})
    return None if final else NEED_MORE


def parse_client_hello(body: bytes) -> dict[str, Any] | None:
    """Fields of a ClientHello body (after the 4-byte handshake header); None when malformed."""
    n = len(body)
    if n < 38:
        return None
    legacy = int.from_bytes(body[0:2], "big")
    pos = 34
    sid_len = body[pos]
    pos += 1 + sid_len
    if sid_len > 32 or pos + 2 > n:
        return None
    cs_len = int.from_bytes(body[pos:pos + 2], "big")
    pos += 2 + cs_len
    if cs_len < 2 or cs_len % 2 or pos + 1 > n:
        return None
    comp_len = body[pos]
    pos += 1 + comp_len
    if comp_len < 1 or pos > n:
        return None
    details: dict[str, Any] = {"sni": None, "alpn": [], "legacy_version": _version_name(legacy),
                               "versions": [], "ech": False}
    if pos == n:
        return details  # no extensions: a pre-TLS1.2-style hello
    if pos + 2 > n:
        return None
    ext_end = pos + 2 + int.from_bytes(body[pos:pos + 2], "big")
    pos += 2
    if ext_end > n:
        return None
    while pos + 4 <= ext_end:
        etype = int.from_bytes(body[pos:pos + 2], "big")
        elen = int.from_bytes(body[pos + 2:pos + 4], "big")
        pos += 4
        if pos + elen > ext_end:
            return None
        ext = body[pos:pos + elen]
        pos += elen
        if etype == _EXT_SNI:
            details["sni"] = _parse_sni(ext)
        elif etype == _EXT_ALPN:
            details["alpn"] = _parse_alpn(ext)
        elif etype == _EXT_SUPPORTED_VERSIONS and ext:
            vs = ext[1:1 + ext[0]]
            details["versions"] = [_version_name(int.from_bytes(vs[i:i + 2], "big"))
                                   for i in range(0, len(vs) - 1, 2)
                                   if not _is_grease(int.from_bytes(vs[i:i + 2], "big"))]
        elif etype == _EXT_ECH:
            details["ech"] = True
    if pos != ext_end:
        return None
    if not details["versions"]:
        details["versions"] = [_version_name(legacy)]
    return details


def _parse_sni(ext: bytes) -> str | None:
    """First host_name entry of the server_name list (RFC 6066 §3 allows only one per type)."""
    if len(ext) < 2:
        return None
    end = min(len(ext), 2 + int.from_bytes(ext[0:2], "big"))
    pos = 2
    while pos + 3 <= end:
        ntype = ext[pos]
        nlen = int.from_bytes(ext[pos + 1:pos + 3], "big")
        name = ext[pos + 3:pos + 3 + nlen]
        pos += 3 + nlen
        if ntype == 0 and len(name) == nlen:
            return _text(name)
    return None


def _parse_alpn(ext: bytes) -> list[str]:
    if len(ext) < 2:
        return []
    end = min(len(ext), 2 + int.from_bytes(ext[0:2], "big"))
    out: list[str] = []
    pos = 2
    while pos < end:
        plen = ext[pos]
        proto = ext[pos + 1:pos + 1 + plen]
        pos += 1 + plen
        if plen and len(proto) == plen:
            out.append(_text(proto))
    return out
