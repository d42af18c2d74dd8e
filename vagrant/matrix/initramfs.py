"""A busybox initramfs that turns the host's / (over virtio-9p, read-only) into the guest's root.

Stage 1 (this /init) loads the 9p, virtio and overlay modules of the booted kernel, mounts the
host's / read-only, lays tmpfs on /run /tmp /root and overlays on /etc /var, bind-mounts the
kernel's unpacked modules at /lib/modules/$(uname -r), mounts proc, sys, dev, cgroup2, bpffs,
debugfs and tracefs, mounts the job share (read-write) at /run/il-job, and switch_roots into
/run/il-job/stage2.sh, which the runner wrote. switch_root, not chroot: the kernel's module
autoload (nf_tables and friends) calls /sbin/modprobe in the real root."""

from __future__ import annotations

import gzip
import io
import lzma
from pathlib import Path

from vagrant.matrix.kernels import Kernel

BUSYBOX = Path("/bin/busybox")

# What stage 1 needs before the host's / is there (their dependencies come from modules.dep).
MODULES = ("virtio_pci", "virtio-rng", "9pnet_virtio", "9p", "overlay")

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot /bin
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
. /config
fail() {
  echo "IL-STAGE1-FAIL: $*"
  echo o > /proc/sysrq-trigger
  sleep 30
}
echo "IL-STAGE1 $(uname -r)"
while read -r m; do
  [ -n "$m" ] && { insmod "/lib/modules/$m" || fail "insmod $m"; }
done < /modules
R=/newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot $R || fail "mount hostroot"
# the kernel's modules (with the build/source links to its unpacked headers)
mount -t tmpfs -o mode=755 tmpfs $R/lib/modules || fail "tmpfs lib/modules"
mkdir -p "$R/lib/modules/$REL"
mount -o bind "$R$KMODULES" "$R/lib/modules/$REL" || fail "bind modules"
mount -t tmpfs -o mode=755 tmpfs $R/run || fail "tmpfs run"
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mount -t tmpfs -o mode=700 tmpfs $R/root
for d in etc var; do
  mkdir -p $R/run/.ovl/$d/upper $R/run/.ovl/$d/work
  mount -t overlay overlay -o lowerdir=$R/$d,upperdir=$R/run/.ovl/$d/upper,workdir=$R/run/.ovl/$d/work $R/$d \
    || fail "overlay $d"
done
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || fail "cgroup2"
mount -t bpf bpf $R/sys/fs/bpf || fail "bpffs"
mount -t debugfs debugfs $R/sys/kernel/debug
mount -t tracefs tracefs $R/sys/kernel/tracing 2>/dev/null
# the repository (and its .venv) at its host path, also where the guest has tmpfs (/tmp, /root)
mkdir -p "$R$REPO" 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 repo "$R$REPO" || fail "mount repo"
mkdir -p $R/run/il-job
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 job $R/run/il-job || fail "mount job"
[ -x $R/run/il-job/stage2.sh ] || fail "no stage2.sh in the job share"
exec switch_root $R /bin/bash /run/il-job/stage2.sh
"""


def _closure(k: Kernel, names: tuple[str, ...]) -> list[str]:
    """Module files (relative to the modules dir) in load order, dependencies first."""
    deps: dict[str, list[str]] = {}
    for line in (k.modules / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {}
    for mod in deps:
        base = Path(mod).name.split(".ko")[0]
        by_name[base] = mod
        by_name[base.replace("-", "_")] = mod
    builtin = (k.modules / "modules.builtin").read_text() if (k.modules / "modules.builtin").exists() else ""
    order: list[str] = []

    def add(mod: str) -> None:
        if mod in order:
            return
        # modules.dep lists the full closure, the deepest last
        for d in reversed(deps.get(mod, [])):
            add(d)
        order.append(mod)

    for n in names:
        mod = by_name.get(n) or by_name.get(n.replace("-", "_"))
        if mod:
            add(mod)
        elif f"/{n}.ko" not in builtin and f"/{n.replace('-', '_')}.ko" not in builtin:
            raise RuntimeError(f"kernel {k.release}: module {n} neither built in nor packaged")
    return order


def _ko_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".zst":
        raise RuntimeError(f"{path.name}: zstd-compressed modules are not supported by this initramfs")
    if path.suffix == ".gz":
        return gzip.decompress(data)
    return data


class _Cpio:
    """newc archive writer (what the kernel unpacks as an initramfs)."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        raw = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        self.buf.write(b"\0" * (-(110 + len(raw)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def build(k: Kernel, out: Path, repo: Path) -> Path:
    if not BUSYBOX.exists():
        raise RuntimeError("busybox missing: apt-get install busybox-static")
    c = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    c.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    c.file("init", INIT.encode(), 0o755)
    c.file("config", f"REL='{k.release}'\nKMODULES='{k.modules}'\nREPO='{repo}'\n".encode())
    loaded = []
    for mod in _closure(k, MODULES):
        name = Path(mod).name.split(".ko")[0] + ".ko"
        c.file(f"lib/modules/{name}", _ko_bytes(k.modules / mod))
        loaded.append(name)
    c.file("modules", ("\n".join(loaded) + "\n").encode())
    out.write_bytes(gzip.compress(c.finish(), compresslevel=1))
    return out
