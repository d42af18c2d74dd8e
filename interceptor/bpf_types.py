"""ctypes mirror of bpf/interlock.h: the structs that cross between kernel and Python."""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct

_V4_PREFIX = b"\0" * 10 + b"\xff\xff"
AF_INET = 2
AF_INET6 = 10
COMM_LEN = 16
PATH_LEN = 256


class Settings(ctypes.Structure):
    _fields_ = [
        ("proxy_port", ctypes.c_uint32),  # network byte order
        ("dns_port", ctypes.c_uint32),  # network byte order
        ("mark", ctypes.c_uint32),
        ("lockdown", ctypes.c_uint32),
    ]


_PORT = struct.Struct("=I").pack


class Endpoint(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint8 * 16), ("port", ctypes.c_uint32)]

    @classmethod
    def of(cls, host: str, port: int) -> Endpoint:
        """From a peer address as the socket layer gives it (on the accept path: keep it cheap)."""
        if ":" in host:
            packed = socket.inet_pton(socket.AF_INET6, host.split("%")[0])
        else:
            packed = _V4_PREFIX + socket.inet_pton(socket.AF_INET, host)
        return cls.from_buffer_copy(packed + _PORT(port))  # addr[16] then the u32 port, native order

    def address(self) -> str:
        raw = bytes(self.addr)
        if raw[:12] == _V4_PREFIX:
            return socket.inet_ntop(socket.AF_INET, raw[12:])
        return str(ipaddress.IPv6Address(raw))


class Origin(ctypes.Structure):
    _fields_ = [
        ("dst", Endpoint),
        ("family", ctypes.c_uint32),
        ("agent_id", ctypes.c_uint32),
        ("tgid", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("cgroup_id", ctypes.c_uint64),
        ("created_ns", ctypes.c_uint64),
        ("comm", ctypes.c_char * COMM_LEN),
    ]


class ExecEvent(ctypes.Structure):
    _fields_ = [
        ("tgid", ctypes.c_uint32),
        ("ppid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("agent_id", ctypes.c_uint32),
        ("cgroup_id", ctypes.c_uint64),
        ("comm", ctypes.c_char * COMM_LEN),
        ("outside_scope", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


GUARD_SYSCALLS = {1: "ptrace", 2: "process_vm_writev", 3: "process_vm_readv", 4: "pidfd_getfd", 5: "socket"}


class GuardEvent(ctypes.Structure):
    _fields_ = [
        ("tgid", ctypes.c_uint32),
        ("target_tgid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("agent_id", ctypes.c_uint32),
        ("syscall", ctypes.c_uint32),  # GUARD_SYSCALLS key
        ("pad", ctypes.c_uint32),
        ("cgroup_id", ctypes.c_uint64),
        ("comm", ctypes.c_char * COMM_LEN),
    ]


class Path(ctypes.Structure):
    _fields_ = [("s", ctypes.c_char * PATH_LEN)]
