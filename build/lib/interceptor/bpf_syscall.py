"""The few bpf(2) commands the daemon and the proxy need, without importing bcc.

The proxy only reads pinned maps; doing that through the raw syscall keeps bcc (and its LLVM)
out of the data-path process. Each command's attribute block is a ctypes struct padded to the
128 bytes the kernel reads (union bpf_attr, include/uapi/linux/bpf.h)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_SYS_BPF = 321  # x86_64
_ATTR_SIZE = 128

MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 1, 2, 3, 4
OBJ_PIN, OBJ_GET, PROG_ATTACH, PROG_DETACH = 6, 7, 8, 9
PROG_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD, PROG_QUERY, RAW_TRACEPOINT_OPEN = 13, 15, 16, 17
MAP_LOOKUP_AND_DELETE_ELEM = 21
F_ALLOW_MULTI, F_REPLACE = 2, 4
ENOENT, EINVAL, EOPNOTSUPP, ENOTSUPP = 2, 22, 95, 524
_PROG_INFO_NAME_OFFSET = 64  # struct bpf_prog_info.name


def _attr(*fields: tuple[str, type]) -> type[ctypes.Structure]:
    size = sum(ctypes.sizeof(t) for _, t in fields)
    return type("Attr", (ctypes.Structure,), {"_fields_": [*fields, ("_pad", ctypes.c_uint8 * (_ATTR_SIZE - size))]})


_u32, _u64 = ctypes.c_uint32, ctypes.c_uint64
_Elem = _attr(("map_fd", _u32), ("pad0", _u32), ("key", _u64), ("value", _u64), ("flags", _u64))
_Obj = _attr(("pathname", _u64), ("bpf_fd", _u32), ("file_flags", _u32))
_Attach = _attr(("target_fd", _u32), ("attach_bpf_fd", _u32), ("attach_type", _u32), ("attach_flags", _u32),
                ("replace_bpf_fd", _u32))
_Query = _attr(("target_fd", _u32), ("attach_type", _u32), ("query_flags", _u32), ("attach_flags", _u32),
               ("prog_ids", _u64), ("prog_cnt", _u32))
_Id = _attr(("id", _u32), ("next_id", _u32), ("open_flags", _u32))
_Info = _attr(("bpf_fd", _u32), ("info_len", _u32), ("info", _u64))
_RawTp = _attr(("name", _u64), ("prog_fd", _u32))


def _bpf(cmd: int, attr: ctypes.Structure, absent: tuple[int, ...] = ()) -> int | None:
    """The syscall's result; None when it failed with one of the `absent` errnos."""
    ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        if err in absent:
            return None
        raise OSError(err, f"bpf cmd {cmd}: {os.strerror(err)}")
    return ret


def _addr(obj) -> int:
    return ctypes.addressof(obj) if obj is not None else 0


def _path(path: str) -> ctypes.Array:
    return ctypes.create_string_buffer(path.encode())


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    """Attach a raw tracepoint program; the fd is a bpf link that can be pinned to outlive us."""
    n = _path(name)
    return _bpf(RAW_TRACEPOINT_OPEN, _RawTp(name=_addr(n), prog_fd=prog_fd))


def obj_get(path: str) -> int:
    """Open a pinned map, program or link; returns a new fd."""
    p = _path(path)
    return _bpf(OBJ_GET, _Obj(pathname=_addr(p)))


def obj_pin(fd: int, path: str) -> None:
    p = _path(path)
    _bpf(OBJ_PIN, _Obj(pathname=_addr(p), bpf_fd=fd))


def map_lookup(fd: int, key, value) -> bool:
    """Fill `value` from the map; False when the key is absent."""
    return _bpf(MAP_LOOKUP_ELEM, _Elem(map_fd=fd, key=_addr(key), value=_addr(value)), (ENOENT,)) is not None


def map_update(fd: int, key, value, flags: int = 0) -> None:
    _bpf(MAP_UPDATE_ELEM, _Elem(map_fd=fd, key=_addr(key), value=_addr(value), flags=flags))


def map_delete(fd: int, key) -> bool:
    return _bpf(MAP_DELETE_ELEM, _Elem(map_fd=fd, key=_addr(key)), (ENOENT,)) is not None


def map_next_key(fd: int, key, next_key) -> bool:
    """Fill `next_key` with the key after `key` (the first key when `key` is None)."""
    return _bpf(MAP_GET_NEXT_KEY, _Elem(map_fd=fd, key=_addr(key), value=_addr(next_key)), (ENOENT,)) is not None


def map_take(fd: int, key, value) -> bool | None:
    """Lookup and delete in one syscall (hash maps, kernel ≥ 5.14); None where unsupported."""
    attr = _Elem(map_fd=fd, key=_addr(key), value=_addr(value))
    try:
        return _bpf(MAP_LOOKUP_AND_DELETE_ELEM, attr, (ENOENT,)) is not None
    except OSError as e:
        if e.errno in (EINVAL, EOPNOTSUPP, ENOTSUPP):  # an older kernel
            return None
        raise


def prog_attach(prog_fd: int, cgroup_fd: int, attach_type: int, flags: int = 0, replace_fd: int = 0) -> None:
    _bpf(PROG_ATTACH, _Attach(target_fd=cgroup_fd, attach_bpf_fd=prog_fd, attach_type=attach_type,
                              attach_flags=flags, replace_bpf_fd=replace_fd))


def prog_detach(cgroup_fd: int, attach_type: int, prog_fd: int = 0) -> bool:
    """Detach a program (by fd, as multi-attach requires); False when it was not attached."""
    attr = _Attach(target_fd=cgroup_fd, attach_type=attach_type, attach_bpf_fd=prog_fd)
    return _bpf(PROG_DETACH, attr, (ENOENT, EINVAL)) is not None


def prog_query(cgroup_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached directly to this cgroup for this hook."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _Query(target_fd=cgroup_fd, attach_type=attach_type, prog_ids=_addr(ids), prog_cnt=64)
    _bpf(PROG_QUERY, attr)
    return list(ids[: attr.prog_cnt])


def prog_fd_by_id(prog_id: int) -> int:
    return _bpf(PROG_GET_FD_BY_ID, _Id(id=prog_id))


def prog_name(prog_fd: int) -> str:
    """The program's name as loaded (bcc uses the C function's name, cut to 15 bytes)."""
    info = (ctypes.c_uint8 * 256)()
    _bpf(OBJ_GET_INFO_BY_FD, _Info(bpf_fd=prog_fd, info_len=256, info=_addr(info)))
    raw = bytes(info[_PROG_INFO_NAME_OFFSET:_PROG_INFO_NAME_OFFSET + 16])
    return raw.split(b"\0", 1)[0].decode(errors="replace")
