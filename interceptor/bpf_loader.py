"""Compile the programs with bcc, pin their maps, attach them to the instance cgroup.

Attachments use the legacy (non-link) call: they outlive the daemon, so a killed daemon leaves
agents redirected to a proxy port (refused if the proxy is gone too). They are multi-attach, so
other tools (systemd, a service mesh) keep theirs on the same cgroups, and a restarted daemon
swaps its old program for the new one with BPF_F_REPLACE: atomically, with no gap."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bpf import SOURCE_DIR
from interceptor import bpf_syscall as sc
from interceptor import btf
from interceptor.bpf_types import Settings

MULTI = sc.F_ALLOW_MULTI
PROG_CGROUP_SKB = 8
PROG_CGROUP_SOCK = 9
PROG_SOCK_OPS = 13
PROG_CGROUP_SOCK_ADDR = 18


@dataclass(frozen=True)
class Hook:
    func: str
    prog_type: int
    attach_type: int
    since: str  # first kernel with this hook


class HookLoadError(RuntimeError):
    """The kernel refused one of the programs: names the hook and the kernel it needs."""

    def __init__(self, hook: Hook, reason: str):
        super().__init__(f"the kernel refused the {hook.func} program ({reason}); it needs kernel ≥ {hook.since}")
        self.fix = f"run on a kernel ≥ {hook.since} with CONFIG_CGROUP_BPF=y and CONFIG_BPF_SYSCALL=y"


# One row a hook: what attaches to the capture cgroup.
HOOKS = (
    Hook("il_connect4", PROG_CGROUP_SOCK_ADDR, 10, "4.17"),
    Hook("il_connect6", PROG_CGROUP_SOCK_ADDR, 11, "4.17"),
    Hook("il_sendmsg4", PROG_CGROUP_SOCK_ADDR, 14, "4.18"),
    Hook("il_sendmsg6", PROG_CGROUP_SOCK_ADDR, 15, "4.18"),
    Hook("il_recvmsg4", PROG_CGROUP_SOCK_ADDR, 19, "5.2"),
    Hook("il_recvmsg6", PROG_CGROUP_SOCK_ADDR, 20, "5.2"),
    Hook("il_getpeername4", PROG_CGROUP_SOCK_ADDR, 29, "5.8"),
    Hook("il_getpeername6", PROG_CGROUP_SOCK_ADDR, 30, "5.8"),
    Hook("il_sockops", PROG_SOCK_OPS, 3, "5.7"),
    Hook("il_sock_create", PROG_CGROUP_SOCK, 2, "4.10"),
    Hook("il_sock_release", PROG_CGROUP_SOCK, 34, "5.9"),
    Hook("il_ingress", PROG_CGROUP_SKB, 0, "5.1"),  # bpf/inbound.bpf.c
)

PROGRAM_FILES = ("redirect.bpf.c", "lineage.bpf.c", "inbound.bpf.c", "guard.bpf.c")
# BPF LSM programs of the ptrace guard (bpf/guard.bpf.c): (bcc function, pin name of its link).
GUARD = ((b"lsm__ptrace_access_check", "link_ptrace_access"), (b"lsm__ptrace_traceme", "link_ptrace_traceme"))
# Syscalls whose refusals the guard records (syscall tracepoints, where the kernel has them).
GUARD_SYSCALLS = ("ptrace", "process_vm_writev", "process_vm_readv", "pidfd_getfd", "socket")
TRACEFS_SYSCALLS = Path("/sys/kernel/tracing/events/syscalls")
PROG_RAW_TRACEPOINT = 17
# Raw tracepoint programs of the lineage family: (function, tracepoint, pin name).
LINEAGE = (("il_exec", "sched_process_exec", "link_exec"), ("il_fork", "sched_process_fork", "link_fork"),
           ("il_exit", "sched_process_exit", "link_exit"))
PINNED_MAPS = ("settings", "agent_cgroups", "agent_tgids", "by_cookie", "by_peer",
               "exe_selectors", "uid_selectors")
_MAP_LINE = re.compile(r"^IL_MAP\((\w+), ([^,]+), ([^,]+), (\w+), (\d+)\);", re.M)


# What bcc and the pins need mounted: (mount point, fs type). bcc reads tracepoint formats from
# debugfs' tracing directory.
REQUIRED_MOUNTS = (("/sys/fs/bpf", "bpf"), ("/sys/kernel/debug", "debugfs"),
                   ("/sys/kernel/tracing", "tracefs"))


def mounted(point: str, fstype: str) -> bool:
    with open("/proc/mounts") as f:
        return any(p[1] == point and p[2] == fstype for p in (line.split() for line in f))


def ensure_mounts() -> None:
    """Mount bpffs, debugfs and tracefs where the host has not."""
    for point, fstype in REQUIRED_MOUNTS:
        if mounted(point, fstype):
            continue
        os.makedirs(point, exist_ok=True)
        if subprocess.run(["mount", "-t", fstype, fstype, point]).returncode != 0:
            raise RuntimeError(f"cannot mount {fstype} at {point}; mount it: mount -t {fstype} {fstype} {point}")


def render_maps(pin_dir: Path) -> str:
    """maps.h with each IL_MAP turned into a fresh table or the instance's pinned one."""
    text = (SOURCE_DIR / "maps.h").read_text()

    def one(m: re.Match) -> str:
        kind, key, val, name, size = m.groups()
        pin = pin_dir / name
        if pin.exists():
            return f'BPF_TABLE_PINNED("{kind}", {key}, {val}, {name}, {size}, "{pin}");'
        return f'BPF_TABLE("{kind}", {key}, {val}, {name}, {size});'

    return _MAP_LINE.sub(one, text)


class Datapath:
    """The compiled programs of one instance and the maps they share with the proxy."""

    def __init__(self, pin_dir: Path, cgroup_dir: Path, pin: bool = True):
        self.pin = pin
        self.pin_dir = pin_dir
        self.cgroup_dir = cgroup_dir
        self.bpf = None
        self.funcs: dict[str, object] = {}
        self.lineage_error: str | None = None
        self.guard_error: str | None = None  # why the ptrace guard was not compiled
        self.guard_record = False  # refused ptrace-class syscalls are traced

    def compile(self) -> None:
        from bcc import BPF  # bcc loads LLVM; only the daemon pays for it

        ensure_mounts()
        if self.pin:
            self.pin_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="interlock-bpf-") as tmp:
            # bcc rewrites tracepoint and map syntax only in the main text, so the programs are
            # concatenated; quoted includes resolve next to the includer first, so the headers
            # come from a copy that holds the rendered maps.h.
            for src in SOURCE_DIR.glob("*.h"):
                Path(tmp, src.name).write_text(src.read_text())
            Path(tmp, "maps.h").write_text(render_maps(self.pin_dir))
            text = "\n".join((SOURCE_DIR / f).read_text() for f in PROGRAM_FILES)
            try:
                offsets = btf.lineage_offsets()
                self.lineage_error = None
            except btf.BTFError as e:  # the lineage programs then compile but are never attached
                offsets = {"IL_BPRM_FILENAME_OFF": 0, "IL_TASK_TGID_OFF": 0}
                self.lineage_error = str(e)
            defines = [f"-D{k}={v}" for k, v in offsets.items()]
            self.bpf = self._compile_with_guard(BPF, text, [f"-I{tmp}", *defines])
        for name in PINNED_MAPS if self.pin else ():
            pin = self.pin_dir / name
            if not pin.exists():
                sc.obj_pin(self.bpf[name].map_fd, str(pin))
        for hook in HOOKS:
            try:
                self.funcs[hook.func] = self.bpf.load_func(hook.func, hook.prog_type, attach_type=hook.attach_type)
            except Exception as e:
                raise HookLoadError(hook, str(e).splitlines()[0][:200]) from None

    def _compile_with_guard(self, bpf_class, text: str, cflags: list[str]):
        """Compile with the ptrace guard and its refusal tracepoints where the kernel takes them,
        dropping what it refuses: the guard must never cost the capture (guard_error says why).
        bcc attaches the lsm__ and tracepoint__ functions as it loads them (links we hold)."""
        guard = self._guard_defines()
        record = ["-DIL_GUARD_RECORD=1"] if all(
            Path(TRACEFS_SYSCALLS, f"sys_{d}_{c}").is_dir() for d in ("enter", "exit") for c in GUARD_SYSCALLS) else []
        attempts: list[list[str]] = []
        for a in ([*guard, *record], record, []):
            if a not in attempts:
                attempts.append(a)
        for extra in attempts:
            try:
                compiled = bpf_class(text=text, cflags=[*cflags, *extra])
                if record and record[0] in extra:
                    for call in GUARD_SYSCALLS:
                        for side in ("enter", "exit"):
                            compiled.attach_tracepoint(tp=f"syscalls:sys_{side}_{call}", fn_name=f"il_sys_{side}")
            except Exception as e:
                if not extra:
                    raise
                if guard and "-DIL_GUARD=1" in extra:
                    reason = str(e).splitlines()[0][:160]
                    if "super-user" in reason:  # bcc's words for EPERM from BPF_PROG_LOAD
                        reason = "loading BPF LSM programs is not permitted here (EPERM)"
                    self.guard_error = f"the kernel refused the ptrace guard: {reason}"
                continue
            self.guard_record = bool(record) and record[0] in extra
            return compiled
        raise AssertionError("the last attempt compiles without the guard or raises")

    def _guard_defines(self) -> list[str]:
        """-D flags that compile the ptrace guard, or [] (with guard_error set) where it cannot be."""
        from bcc import BPF

        self.guard_error = None
        if not BPF.support_lsm():
            self.guard_error = "the kernel has no BPF LSM (CONFIG_BPF_LSM)"
            return []
        try:
            btf.lineage_offsets()  # the guard also reads task_struct.tgid, passed in for the lineage
            offsets = btf.guard_offsets()
        except btf.BTFError as e:
            self.guard_error = str(e)
            return []
        return ["-DIL_GUARD=1", *(f"-D{k}={v}" for k, v in offsets.items())]

    def pin_guard(self) -> None:
        """Pin the guard's links: the guard stays in force while the daemon is down. A restart's
        new links are attached (at compile) before the old pins are dropped, so there is no gap."""
        if self.guard_error:
            return
        for func, pin_name in GUARD:
            pin = self.pin_dir / pin_name
            pin.unlink(missing_ok=True)
            sc.obj_pin(self.bpf.lsm_fds[func], str(pin))

    def open_guard_events(self, callback) -> bool:
        """Report refused ptrace-class syscalls of agents; False where they cannot be traced."""
        if not self.guard_record:
            return False
        self.bpf["guard_events"].open_perf_buffer(callback)
        return True

    def attach(self) -> None:
        """Attach every hook, replacing this project's previous program in place if there is one."""
        fd = os.open(self.cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for hook in HOOKS:
                ours = _our_programs(fd, hook)
                new_fd = self.funcs[hook.func].fd
                if ours:
                    try:
                        sc.prog_attach(new_fd, fd, hook.attach_type, MULTI | sc.F_REPLACE, ours[0])
                    finally:
                        for old in ours[1:]:
                            sc.prog_detach(fd, hook.attach_type, old)
                        for old in ours:
                            os.close(old)
                else:
                    sc.prog_attach(new_fd, fd, hook.attach_type, MULTI)
        finally:
            os.close(fd)

    def attach_lineage(self) -> None:
        """Attach exec/fork/exit through pinned links: enrollment at exec keeps working while the
        daemon is down. A restart attaches the new links before it drops the old pins."""
        if self.lineage_error:
            raise RuntimeError(f"exe/uid selectors need the lineage programs: {self.lineage_error}")
        self.bpf["capture_scope"][0] = str(self.cgroup_dir)  # before any link: no exec unjudged
        for func, tp, pin_name in LINEAGE:
            fn = self.bpf.load_func(func, PROG_RAW_TRACEPOINT)
            link = sc.raw_tracepoint_open(tp, fn.fd)
            pin = self.pin_dir / pin_name
            pin.unlink(missing_ok=True)
            sc.obj_pin(link, str(pin))
            os.close(link)

    def map_fd(self, name: str) -> int:
        return self.bpf[name].map_fd

    def open_exec_events(self, callback) -> None:
        self.bpf["exec_events"].open_perf_buffer(callback)

    def poll(self, timeout_ms: int) -> None:
        self.bpf.perf_buffer_poll(timeout=timeout_ms)


def _our_programs(cgroup_fd: int, hook: Hook) -> list[int]:
    """fds of the programs of ours attached for this hook (others' programs share the cgroup)."""
    fds = []
    for prog_id in sc.prog_query(cgroup_fd, hook.attach_type):
        try:
            pfd = sc.prog_fd_by_id(prog_id)
        except OSError:
            continue  # detached meanwhile
        if sc.prog_name(pfd) == hook.func[:15]:
            fds.append(pfd)
        else:
            os.close(pfd)
    return fds


def attached(cgroup_dir: Path) -> dict[str, int]:
    """How many of our programs are attached to the cgroup per hook (0 where one is missing)."""
    try:
        fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return {h.func: 0 for h in HOOKS}
    try:
        out = {}
        for h in HOOKS:
            ours = _our_programs(fd, h)
            out[h.func] = len(ours)
            for pfd in ours:
                os.close(pfd)
        return out
    finally:
        os.close(fd)


def detach_all(cgroup_dir: Path) -> int:
    """Detach every program of ours from the cgroup; returns how many were attached."""
    try:
        fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return 0
    count = 0
    try:
        for h in HOOKS:
            for pfd in _our_programs(fd, h):
                count += sc.prog_detach(fd, h.attach_type, pfd)
                os.close(pfd)
        return count
    finally:
        os.close(fd)


class PinnedMap:
    """A pinned map opened by path: how the proxy and the CLI reach the daemon's maps."""

    def __init__(self, path: Path):
        self.fd = sc.obj_get(str(path))
        self._atomic_take = True

    def lookup(self, key, value) -> bool:
        return sc.map_lookup(self.fd, key, value)

    def update(self, key, value) -> None:
        sc.map_update(self.fd, key, value)

    def delete(self, key) -> bool:
        return sc.map_delete(self.fd, key)

    def take(self, key, value) -> bool:
        """Read and remove an entry, atomically where the kernel can."""
        if self._atomic_take:
            got = sc.map_take(self.fd, key, value)
            if got is not None:
                return got
            self._atomic_take = False
        if not sc.map_lookup(self.fd, key, value):
            return False
        sc.map_delete(self.fd, key)
        return True

    def keys(self, key_type) -> list:
        out, key = [], None
        while True:
            nxt = key_type()
            if not sc.map_next_key(self.fd, key, nxt):
                return out
            out.append(nxt)
            key = nxt

    def close(self) -> None:
        os.close(self.fd)


def write_settings(pin_dir: Path, settings: Settings) -> None:
    m = PinnedMap(pin_dir / "settings")
    try:
        m.update(ctypes.c_uint32(0), settings)
    finally:
        m.close()


def read_settings(pin_dir: Path) -> Settings | None:
    try:
        m = PinnedMap(pin_dir / "settings")
    except OSError:
        return None
    try:
        s = Settings()
        return s if m.lookup(ctypes.c_uint32(0), s) else None
    finally:
        m.close()
