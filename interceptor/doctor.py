"""Host checks: what the kernel and the tools must offer before the daemon may start.

The daemon runs the fatal checks first and refuses to start on any failure, so it is never
half-working with traffic going direct."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    fatal: bool = True


# Hooks by the kernel that first offered them (the oldest decides the floor).
MIN_KERNEL = (5, 9)  # cgroup/sock_release; getpeername hooks need 5.8, sock_ops cookies 5.7


def kernel_version(release: str | None = None) -> tuple[int, int]:
    parts = (release or platform.release()).split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def run_checks(quick: bool = False) -> list[Check]:
    out = [_root(), _kernel(), _cgroup2(), _btf(), _bcc(), _headers(), _nft()]
    if not quick and all(c.ok for c in out if c.fatal):
        programs, guard_error = _programs()
        out.append(programs)
        out.append(_ptrace_guard(guard_error))
    return out


def _ptrace_guard(guard_error: str | None) -> Check:
    """Which defence would stop an agent borrowing an un-enrolled process (interceptor/ptrace_guard.py)."""
    from interceptor import ptrace_guard as pg

    lsms = pg.active_lsms()
    if guard_error is None and lsms is not None and "bpf" not in lsms:
        guard_error = f"`bpf` is not in the active LSMs ({','.join(lsms)})"
    bpf = guard_error if guard_error is not None else None
    try:
        d = pg.decide(bpf, pg.yama_scope(), pg.landlock_abi(), allow_unguarded=False)
    except pg.GuardError as e:
        return Check("ptrace guard", False, str(e), "boot with lsm=...,bpf, or sysctl kernel.yama.ptrace_scope=1 "
                     "(see docs/KERNELS.md)", fatal=False)
    detail = f"{d.name}: {d.detail}"
    if d.name == "bpf-lsm":
        detail = ("bpf-lsm: the guard loads" + (f"; active LSMs {','.join(lsms)}" if lsms else "")
                  + "; the daemon's self-test at start confirms the hook is called")
    return Check("ptrace guard", d.covers_all, detail,
                 "boot with lsm=...,bpf, or sysctl kernel.yama.ptrace_scope=1: the guard then covers processes "
                 "enrolled by selector and enroll --pid too", fatal=False)


def _root() -> Check:
    ok = os.geteuid() == 0
    return Check("root", ok, "running as root" if ok else f"running as uid {os.geteuid()}", "run as root: sudo interlock …")


def _kernel() -> Check:
    v = kernel_version()
    ok = v >= MIN_KERNEL
    return Check("kernel", ok, f"{platform.release()} (need ≥ {MIN_KERNEL[0]}.{MIN_KERNEL[1]} for the cgroup socket hooks)",
                 "boot a kernel ≥ 5.9 (Debian 12's 6.1, Ubuntu 22.04's 5.15 and newer all qualify)")


def _cgroup2() -> Check:
    from interceptor.cgroups import CgroupError, cgroup2_mount

    try:
        m = cgroup2_mount()
    except CgroupError as e:
        return Check("cgroup2", False, str(e), "mount -t cgroup2 none /sys/fs/cgroup (or boot with systemd.unified_cgroup_hierarchy=1)")
    return Check("cgroup2", True, f"mounted at {m}")


def _btf() -> Check:
    ok = Path("/sys/kernel/btf/vmlinux").exists()
    return Check("btf", ok, "/sys/kernel/btf/vmlinux present" if ok else "no kernel BTF: exe/uid selectors cannot be used",
                 "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y (all current distro kernels are); "
                 "interlock run / enroll / cgroup selectors work without it", fatal=False)


def _bcc() -> Check:
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return Check("bcc", False, f"python module bcc not importable ({e})",
                     "apt-get install python3-bpfcc bpfcc-tools, and run on /usr/bin/python3 (make install does both)")
    return Check("bcc", True, "python3-bpfcc importable")


def _headers() -> Check:
    build = Path(f"/lib/modules/{platform.release()}/build")
    ok = (build / "include").exists() or (build / "Makefile").exists()
    return Check("kernel headers", ok, f"{build} -> {os.path.realpath(build)}" if ok else f"{build} missing",
                 "apt-get install linux-headers-$(uname -r), or link Debian's linux-headers-amd64 there (make install does)")


def _nft() -> Check:
    try:
        import nftables
    except ImportError:
        return Check("nftables", False, "python3-nftables not importable", "apt-get install nftables python3-nftables")
    nft = nftables.Nftables()
    nft.set_dry_run(True)
    rc, _, err = nft.cmd(
        "table inet interlock-doctor {\n chain o {\n type filter hook output priority 0;\n"
        " meta mark 0x1 ct direction reply accept\n meta l4proto tcp reject with tcp reset\n"
        " reject with icmpx admin-prohibited\n }\n"
        # the inbound diversion (firewall.Backstop, chain inbound): socket lookup and tproxy
        " chain p {\n type filter hook prerouting priority -160;\n"
        " meta l4proto tcp socket mark 0x1 meta nfproto ipv4 tproxy ip to 127.0.0.1:1 accept\n"
        " meta l4proto tcp socket mark 0x1 meta nfproto ipv6 tproxy ip6 to [::1]:1 accept\n }\n}\n")
    ok = rc == 0
    return Check("nftables", ok, f"libnftables {'accepts' if ok else 'rejects'} the backstop's rule types" + ("" if ok else f": {err.strip()}"),
                 "load nf_tables, nft_reject_inet, nft_socket, nft_ct, nft_tproxy (CONFIG_NFT_SOCKET, CONFIG_NFT_TPROXY …); "
                 "apt-get install nftables")


def _programs() -> tuple[Check, str | None]:
    """Compile and load (not attach) every program: the real verdict on the kernel's hooks; and
    why the ptrace guard did not compile (None when it did)."""
    import tempfile

    from interceptor.bpf_loader import Datapath, HookLoadError

    with tempfile.TemporaryDirectory(prefix="interlock-doctor-") as tmp:
        dp = Datapath(Path(tmp) / "pins", Path(tmp), pin=False)
        try:
            dp.compile()
        except HookLoadError as e:
            return Check("bpf programs", False, str(e), e.fix), dp.guard_error
        except Exception as e:  # bcc reports compile failures as plain Exceptions
            return Check("bpf programs", False, f"compile failed: {str(e).splitlines()[0]}",
                         "check the kernel headers link and bcc version (interlock doctor above)"), dp.guard_error
    return Check("bpf programs", True, f"all {len(dp.funcs)} hooks load (connect, sendmsg, recvmsg, getpeername, "
                 f"sock_ops, sock_create/release)"), dp.guard_error


def tools() -> dict[str, str | None]:
    return {t: shutil.which(t) for t in ("nft", "bpftool", "ip", "nsenter")}
