"""What the daemon needs to know about a process before it enrols it: who it really is (a pidfd,
read in the daemon's own PID namespace), whether it is a kernel thread or the init of a PID
namespace, and which processes are below it.

Everything is read from /proc of the daemon's namespace (proc(5)); nothing the client says about
a process is trusted."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

PF_KTHREAD = 0x00200000  # include/linux/sched.h: task->flags of a kernel thread
_SYS_PIDFD_GETFD = 438  # the same number on every architecture (new syscalls are unified)
_libc = ctypes.CDLL(None, use_errno=True)


class NoSuchProcess(LookupError):
    pass


def pid_of_pidfd(fd: int) -> int:
    """The pid a pidfd refers to, in the PID namespace of this process's /proc.

    /proc/self/fdinfo/FD has `Pid: N` (0: not visible from here, -1: exited) since Linux 5.4.
    Raises NoSuchProcess when the process is gone or is not in our namespace's view; ValueError
    when fd is not a pidfd."""
    try:
        text = open(f"/proc/self/fdinfo/{fd}").read()
    except OSError:
        raise ValueError(f"fd {fd} is not open") from None
    for line in text.splitlines():
        if line.startswith("Pid:"):
            pid = int(line.split()[1])
            if pid <= 0:
                raise NoSuchProcess("the process has exited" if pid < 0 else
                                    "the process is in a PID namespace the daemon cannot see")
            return pid
    raise ValueError("the file descriptor passed is not a pidfd")


@dataclass(frozen=True)
class ProcFacts:
    pid: int
    ppid: int
    kthread: bool
    ns_pid: int  # its pid in its own (innermost) PID namespace: 1 for a namespace's init
    comm: str


def facts(pid: int) -> ProcFacts:
    """Raises NoSuchProcess when /proc has no such pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(f"no process {pid}") from None
    # the process names itself (prctl PR_SET_NAME): escape what a terminal would act on
    comm = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in stat[stat.index("(") + 1:stat.rindex(")")])
    rest = stat[stat.rindex(")") + 2:].split()
    ppid, flags = int(rest[1]), int(rest[6])
    ns_pid = pid
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            ns_pid = int(line.split()[-1])
    return ProcFacts(pid, ppid, bool(flags & PF_KTHREAD), ns_pid, comm)


def descendants(pid: int) -> list[int]:
    """pid and every process below it, from /proc (parents before children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A duplicate of another process's file descriptor (pidfd_getfd(2), Linux 5.6): the same
    open file, so the same socket. Needs ptrace-attach rights over the process (root has them)."""
    fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd
