"""Which defence stops an agent from borrowing an un-enrolled process (ptrace, /proc/PID/mem,
process_vm_writev, pidfd_getfd), and the Landlock domain `interlock run` puts agents in.

All of these ask the kernel's ptrace_may_access(), which every active LSM may refuse. Defences,
strongest first:
  bpf-lsm   bpf/guard.bpf.c on the ptrace_access_check and ptrace_traceme hooks: an enrolled
            process may only attach to processes enrolled as the same agent. Covers every way
            of enrolling. Needs CONFIG_BPF_LSM=y, `bpf` in the boot's lsm= list, and a kernel
            that lets the daemon load BPF LSM programs; proven by a self-test at daemon start.
  yama      kernel.yama.ptrace_scope >= 1: only a process's ancestors may attach to it (an
            agent's descendants are enrolled too). Covers every way of enrolling.
  landlock  `interlock run` makes each agent a Landlock domain before it execs; Landlock lets a
            process in a domain attach only to processes in the same or a nested domain.
            Covers `interlock run` only, not processes enrolled by selector or `enroll --pid`.
  none      the operator set `allow_unguarded_ptrace: true`.
The daemon refuses to start with none of them (see `decide`)."""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path

YAMA = Path("/proc/sys/kernel/yama/ptrace_scope")
LSM_LIST = Path("/sys/kernel/security/lsm")
FULL = ("bpf-lsm", "yama")  # defences that cover every enrolled process

_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
# The one filesystem right the ruleset handles, with no rule granting it: creating block device
# nodes (needs CAP_MKNOD anyway). Landlock needs a handled right to build a domain; the domain,
# not the right, is what confines ptrace.
_LANDLOCK_ACCESS_FS_MAKE_BLOCK = 1 << 11
_PR_SET_NO_NEW_PRIVS = 38
_libc = ctypes.CDLL(None, use_errno=True)


class GuardError(RuntimeError):
    pass


@dataclass(frozen=True)
class Defence:
    name: str  # bpf-lsm | yama | landlock | none
    detail: str

    @property
    def covers_all(self) -> bool:
        return self.name in FULL


def yama_scope() -> int | None:
    """kernel.yama.ptrace_scope, or None where Yama is not built in."""
    try:
        return int(YAMA.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def landlock_abi() -> int:
    """The Landlock ABI version the kernel offers; 0 where Landlock is absent or not active."""
    r = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                      ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return max(r, 0)


def active_lsms() -> list[str] | None:
    """The boot's active LSMs from securityfs, None where it is not mounted (doctor's detail only)."""
    try:
        return LSM_LIST.read_text().strip().split(",")
    except OSError:
        return None


def confine_self() -> None:
    """Make the calling process (and everything it execs or forks) its own Landlock domain.

    Root may do so directly; others need no_new_privs first, which is then set (setuid programs
    do not gain privileges inside an agent). Raises GuardError where Landlock is unavailable."""
    if landlock_abi() < 1:
        raise GuardError("Landlock is not available (kernel ≥ 5.13 with `landlock` in the boot's lsm= list)")

    class _Attr(ctypes.Structure):
        _fields_ = [("handled_access_fs", ctypes.c_uint64)]

    attr = _Attr(_LANDLOCK_ACCESS_FS_MAKE_BLOCK)
    fd = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
                       ctypes.c_uint32(0))
    if fd < 0:
        raise GuardError(f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        if _libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, fd, ctypes.c_uint32(0)) == 0:
            return
        if ctypes.get_errno() != errno.EPERM:
            raise GuardError(f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
                _libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, fd, ctypes.c_uint32(0)) != 0:
            raise GuardError(f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def decide(bpf_lsm: str | None, yama: int | None, landlock: int, allow_unguarded: bool) -> Defence:
    """The defence in force. bpf_lsm: None when the BPF LSM guard passed its self-test, else why
    not. Raises GuardError (one line, naming the fixes) when there is none and the operator has
    not accepted that."""
    if bpf_lsm is None:
        return Defence("bpf-lsm", "BPF LSM guard on ptrace_access_check/ptrace_traceme (self-test passed)")
    if yama is not None and yama >= 1:
        return Defence("yama", f"kernel.yama.ptrace_scope={yama}; BPF LSM guard not in force: {bpf_lsm}")
    if landlock >= 1:
        return Defence("landlock", f"Landlock ABI {landlock}: `interlock run` agents only; processes enrolled "
                                   f"by selector or `enroll --pid` are unguarded (BPF LSM: {bpf_lsm}; "
                                   f"Yama: {'absent' if yama is None else f'ptrace_scope={yama}'})")
    if allow_unguarded:
        return Defence("none", "allow_unguarded_ptrace: true — agents can borrow same-uid processes")
    raise GuardError(
        f"no ptrace guard: an agent could borrow an un-enrolled process of its uid (BPF LSM: {bpf_lsm}; "
        f"Yama: {'absent' if yama is None else f'ptrace_scope={yama}'}; Landlock: absent). Fix: boot with "
        "lsm=...,bpf (or lsm=...,landlock), or sysctl kernel.yama.ptrace_scope=1, or accept the risk with "
        "allow_unguarded_ptrace: true")
