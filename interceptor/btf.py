"""Struct member offsets of the running kernel, read from its BTF (/sys/kernel/btf/vmlinux).

bcc compiles against whatever headers are installed, which may not match the running kernel;
the lineage programs therefore read kernel structs at offsets taken from the kernel itself.
Only what the type section needs to be walked is decoded (format: the kernel's btf.rst)."""

from __future__ import annotations

import struct
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
_MAGIC = 0xEB9F
# Extra bytes after the 12-byte btf_type, by kind: fixed, or per member (vlen).
_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}
_PER_MEMBER = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}
_STRUCT, _UNION = 4, 5


class BTFError(RuntimeError):
    pass


def member_offsets(wanted: dict[str, set[str]], path: Path = VMLINUX) -> dict[tuple[str, str], int]:
    """Byte offsets of wanted[struct] members, e.g. {("task_struct", "tgid"): 2348}."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BTFError(f"no kernel BTF at {path} ({e.strerror}); a kernel with CONFIG_DEBUG_INFO_BTF=y is needed") from None
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != _MAGIC:
        raise BTFError(f"{path} is not BTF")
    type_off, type_len, str_off, _str_len = struct.unpack_from("<IIII", data, 8)
    types = hdr_len + type_off
    strings = hdr_len + str_off

    def name(off: int) -> str:
        end = data.index(b"\0", strings + off)
        return data[strings + off:end].decode()

    found: dict[tuple[str, str], int] = {}
    pos, end = types, types + type_len
    while pos < end:
        name_off, info, _size = struct.unpack_from("<III", data, pos)
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        pos += 12
        if kind in (_STRUCT, _UNION) and name_off and (sname := name(name_off)) in wanted:
            for i in range(vlen):
                m_name, _m_type, m_off = struct.unpack_from("<III", data, pos + 12 * i)
                mname = name(m_name) if m_name else ""
                if mname in wanted[sname]:
                    bits = m_off & 0xFFFFFF if kflag else m_off
                    found.setdefault((sname, mname), bits // 8)
        pos += _FIXED.get(kind, 0) + _PER_MEMBER.get(kind, 0) * vlen
    missing = [f"{s}.{m}" for s, ms in wanted.items() for m in ms if (s, m) not in found]
    if missing:
        raise BTFError(f"kernel BTF has no {', '.join(missing)}")
    return found


# Every member the programs read, found in one walk of the kernel's BTF (a few MB; the walk is
# pure Python, slow under emulation, so it is done once a process).
_WANTED = {"linux_binprm": {"filename"}, "task_struct": {"tgid", "cgroups"}, "css_set": {"dfl_cgrp"},
           "cgroup": {"kn"}, "kernfs_node": {"id"}}
_found: dict[tuple[str, str], int] | None = None


def _offsets() -> dict[tuple[str, str], int]:
    global _found
    if _found is None:
        _found = member_offsets(_WANTED)
    return _found


def lineage_offsets() -> dict[str, int]:
    """What the lineage programs read: the exec'd path and a new task's process id."""
    off = _offsets()
    return {"IL_BPRM_FILENAME_OFF": off[("linux_binprm", "filename")], "IL_TASK_TGID_OFF": off[("task_struct", "tgid")]}


def guard_offsets() -> dict[str, int]:
    """What the ptrace guard reads: a task's cgroup id on the default hierarchy
    (task->cgroups->dfl_cgrp->kn->id) and its process id."""
    off = _offsets()
    return {"IL_TASK_CGROUPS_OFF": off[("task_struct", "cgroups")],
            "IL_CSS_SET_DFL_CGRP_OFF": off[("css_set", "dfl_cgrp")],
            "IL_CGROUP_KN_OFF": off[("cgroup", "kn")],
            "IL_KERNFS_NODE_ID_OFF": off[("kernfs_node", "id")]}
