"""The few bpf(2) commands the daemon and the proxy need, without importing bcc.

The proxy only reads pinned maps; doing that through the raw syscall keeps bcc (and its
LLVM) out of the data-path process."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_SYS_BPF = 321  # x86_64

MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
OBJ_PIN = 6
OBJ_GET = 7
PROG_ATTACH = 8
PROG_DETACH = 9
PROG_GET_FD_BY_ID = 13
PROG_QUERY = 16


class _Attr(ctypes.Union):
    _fields_ = [("raw", ctypes.c_uint8 * 128)]


def _call(cmd: int, payload: bytes) -> int:
    attr = _Attr()
    ctypes.memmove(attr.raw, payload, len(payload))
    ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf cmd {cmd}: {os.strerror(err)}")
    return ret


def _call_attr(cmd: int, attr: ctypes.Structure) -> int:
    ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), 128)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf cmd {cmd}: {os.strerror(err)}")
    return ret


class _ElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("rest", ctypes.c_uint8 * 96),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
        ("rest", ctypes.c_uint8 * 112),
    ]


class _AttachAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_bpf_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("replace_bpf_fd", ctypes.c_uint32),
        ("rest", ctypes.c_uint8 * 108),
    ]


class _QueryAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_uint64),
        ("prog_cnt", ctypes.c_uint32),
        ("rest", ctypes.c_uint8 * 100),
    ]


RAW_TRACEPOINT_OPEN = 17


class _RawTpAttr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32), ("rest", ctypes.c_uint8 * 116)]


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    """Attach a raw tracepoint program; the fd is a bpf link that can be pinned to outlive us."""
    n = ctypes.create_string_buffer(name.encode())
    return _call_attr(RAW_TRACEPOINT_OPEN, _RawTpAttr(name=ctypes.addressof(n), prog_fd=prog_fd))


def obj_get(path: str) -> int:
    """Open a pinned map or program; returns a new fd."""
    p = ctypes.create_string_buffer(path.encode())
    return _call_attr(OBJ_GET, _ObjAttr(pathname=ctypes.addressof(p)))


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(path.encode())
    _call_attr(OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(p), bpf_fd=fd))


def map_lookup(fd: int, key: ctypes.Structure | ctypes._SimpleCData, value) -> bool:
    """Fill `value` from the map; False when the key is absent."""
    attr = _ElemAttr(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(value))
    try:
        _call_attr(MAP_LOOKUP_ELEM, attr)
    except OSError as e:
        if e.errno == 2:
            return False
        raise
    return True


def map_update(fd: int, key, value, flags: int = 0) -> None:
    attr = _ElemAttr(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(value), flags=flags)
    _call_attr(MAP_UPDATE_ELEM, attr)


MAP_GET_NEXT_KEY = 4
MAP_LOOKUP_AND_DELETE_ELEM = 21


def map_take(fd: int, key, value) -> bool | None:
    """Lookup and delete in one syscall (hash maps, kernel ≥ 5.14); None where unsupported."""
    attr = _ElemAttr(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(value))
    try:
        _call_attr(MAP_LOOKUP_AND_DELETE_ELEM, attr)
    except OSError as e:
        if e.errno == 2:
            return False
        if e.errno in (22, 95, 524):  # EINVAL, EOPNOTSUPP, ENOTSUPP: older kernel
            return None
        raise
    return True


def map_next_key(fd: int, key, next_key) -> bool:
    """Fill `next_key` with the key after `key` (the first key when `key` is None)."""
    attr = _ElemAttr(map_fd=fd, key=ctypes.addressof(key) if key is not None else 0,
                     value=ctypes.addressof(next_key))
    try:
        _call_attr(MAP_GET_NEXT_KEY, attr)
    except OSError as e:
        if e.errno == 2:
            return False
        raise
    return True


def map_delete(fd: int, key) -> bool:
    attr = _ElemAttr(map_fd=fd, key=ctypes.addressof(key))
    try:
        _call_attr(MAP_DELETE_ELEM, attr)
    except OSError as e:
        if e.errno == 2:
            return False
        raise
    return True


F_ALLOW_MULTI = 2
F_REPLACE = 4


def prog_attach(prog_fd: int, cgroup_fd: int, attach_type: int, flags: int = 0,
                replace_fd: int = 0) -> None:
    _call_attr(PROG_ATTACH, _AttachAttr(target_fd=cgroup_fd, attach_bpf_fd=prog_fd,
                                        attach_type=attach_type, attach_flags=flags,
                                        replace_bpf_fd=replace_fd))


class _IdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32), ("rest", ctypes.c_uint8 * 116)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64), ("rest", ctypes.c_uint8 * 112)]


OBJ_GET_INFO_BY_FD = 15
_PROG_INFO_NAME_OFFSET = 64  # struct bpf_prog_info.name


def prog_fd_by_id(prog_id: int) -> int:
    return _call_attr(PROG_GET_FD_BY_ID, _IdAttr(id=prog_id))


def prog_name(prog_fd: int) -> str:
    """The program's name as loaded (bcc uses the C function's name, cut to 15 bytes)."""
    info = (ctypes.c_uint8 * 256)()
    _call_attr(OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=prog_fd, info_len=256, info=ctypes.addressof(info)))
    raw = bytes(info[_PROG_INFO_NAME_OFFSET:_PROG_INFO_NAME_OFFSET + 16])
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def prog_detach(cgroup_fd: int, attach_type: int, prog_fd: int = 0) -> bool:
    """Detach a program (by fd, as multi-attach requires); False when it was not attached."""
    try:
        _call_attr(PROG_DETACH, _AttachAttr(target_fd=cgroup_fd, attach_type=attach_type,
                                            attach_bpf_fd=prog_fd))
    except OSError as e:
        if e.errno in (2, 22):
            return False
        raise
    return True


def prog_query(cgroup_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached directly to this cgroup for this hook."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _QueryAttr(target_fd=cgroup_fd, attach_type=attach_type,
                      prog_ids=ctypes.addressof(ids), prog_cnt=64)
    _call_attr(PROG_QUERY, attr)
    return list(ids[: attr.prog_cnt])
