"""Debian kernels for the matrix: resolve a short name to a package, download, unpack into a cache.

Nothing is installed into the host's /boot or /lib/modules: `apt-get download` fetches the image
and headers packages, `dpkg-deb -x` unpacks them under CACHE/<release>, `depmod -b` indexes the
modules there, and the headers links (build, source) are pointed at the unpacked headers, by
absolute paths that the guest sees too (it mounts the host's / read-only)."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("INTERLOCK_KERNEL_CACHE", "/var/cache/interlock/kernels"))

# Short names: "6.1" is Debian 12's kernel series (linux-image-6.1.0-NN-amd64), "6.12" the one
# bookworm-security carries (linux-image-6.12.NNN+deb12-amd64). A full release names itself.
_FULL = re.compile(r"^\d+\.\d+\.\d+(-\d+|\+deb\d+)-amd64$")
_SHORT = re.compile(r"^(\d+)\.(\d+)$")


class KernelError(RuntimeError):
    pass


@dataclass(frozen=True)
class Kernel:
    release: str  # what `uname -r` prints in the guest
    root: Path  # the unpacked packages

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    @property
    def headers(self) -> Path:
        return self.root / "usr" / "src" / f"linux-headers-{self.release}"

    @property
    def version(self) -> str:
        stamp = self.root / ".complete"
        return stamp.read_text().split()[0] if stamp.exists() else "?"


def release_key(release: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", release))


def _common(release: str) -> str:
    """linux-headers-6.1.0-56-amd64 needs linux-headers-6.1.0-56-common (6.12: …+deb12-common)."""
    return f"linux-headers-{release.removesuffix('-amd64')}-common"


def _apt_names(pattern: str) -> list[str]:
    r = subprocess.run(["apt-cache", "search", "--names-only", pattern], capture_output=True, text=True)
    return [line.split(" ", 1)[0] for line in r.stdout.splitlines() if line.strip()]


_updated = False


def _apt_update_once() -> None:
    global _updated
    if not _updated:
        _updated = True
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)


def candidates(spec: str) -> list[str]:
    """Releases apt offers for a short name, newest first, each with its headers packaged."""
    m = _SHORT.match(spec)
    if not m:
        raise KernelError(f"kernel {spec!r}: give a series (6.1, 6.12), a release (6.1.0-56-amd64) or 'host'")
    major, minor = m.groups()
    # 6.1 -> 6.1.0-NN-amd64 ; 6.12 -> 6.12.NNN+debNN-amd64
    rel = rf"{major}\.{minor}(\.0-[0-9]+|\.[0-9]+\+deb[0-9]+)-amd64"
    for attempt in range(2):
        images = {n.removeprefix("linux-image-") for n in _apt_names(rf"^linux-image-{rel}$")}
        headers = {n.removeprefix("linux-headers-") for n in _apt_names(rf"^linux-headers-{rel}$")}
        found = sorted(images & headers, key=release_key, reverse=True)
        if found or attempt:
            return found
        _apt_update_once()
    return []


def cached(spec: str) -> list[str]:
    if not CACHE.is_dir():
        return []
    out = [p.name for p in CACHE.iterdir() if (p / ".complete").exists()
           and (p.name == spec or p.name.startswith(spec + ".") or p.name.startswith(spec + "-"))]
    return sorted(out, key=release_key, reverse=True)


def resolve(spec: str) -> str:
    """A release for a spec: the newest that apt offers, or the newest cached one when apt has none."""
    if _FULL.match(spec):
        return spec
    found = candidates(spec) or cached(spec)
    if not found:
        raise KernelError(f"no Debian kernel package for {spec!r} (apt-cache search linux-image-{spec}; "
                          "6.12 needs bookworm-security in sources.list)")
    return found[0]


def fetch(release: str, log=print) -> Kernel:
    """The unpacked kernel, downloaded now if the cache lacks it."""
    root = CACHE / release
    k = Kernel(release, root)
    if (root / ".complete").exists() and k.vmlinuz.exists():
        return k
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / ".complete").exists() and k.vmlinuz.exists():
            return k
        pkgs = [f"linux-image-{release}", f"linux-headers-{release}", _common(release)]
        log(f"kernel {release}: downloading {' '.join(pkgs)}")
        work = Path(tempfile.mkdtemp(prefix=f".fetch-{release}-", dir=CACHE))
        try:
            debs = work / "debs"
            debs.mkdir()
            cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *pkgs]
            r = subprocess.run(cmd, cwd=debs, capture_output=True, text=True)
            if r.returncode != 0:
                _apt_update_once()
                r = subprocess.run(cmd, cwd=debs, capture_output=True, text=True)
            if r.returncode != 0:
                raise KernelError(f"apt-get download {' '.join(pkgs)} failed: {r.stderr.strip()[-500:]}")
            tree = work / "tree"
            versions = []
            for deb in sorted(debs.glob("*.deb")):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
                versions.append(deb.name)
            _prepare(Kernel(release, tree), final_root=root)
            shutil.rmtree(root, ignore_errors=True)
            os.rename(tree, root)
            version = versions[0].split("_")[1] if versions else "?"
            (root / ".complete").write_text(f"{version} {' '.join(versions)}\n")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log(f"kernel {release}: cached in {root}")
    return k


def _prepare(k: Kernel, final_root: Path) -> None:
    if not k.vmlinuz.exists():
        raise KernelError(f"{k.vmlinuz.name} missing from linux-image-{k.release}")
    # modules.dep etc. (the package's postinst would run depmod)
    subprocess.run(["depmod", "-b", str(k.root), k.release], check=True)
    # bcc compiles against /lib/modules/$(uname -r)/{build,source}: the unpacked headers.
    final = Kernel(k.release, final_root)
    common = final_root / "usr" / "src" / _common(k.release)
    for link, target in (("build", final.headers), ("source", common)):
        p = k.modules / link
        if p.is_symlink() or p.exists():
            p.unlink()
        p.symlink_to(target)


def prune(in_use: list[str], per_series: int = 2) -> list[str]:
    """Keep the newest few cached releases of each series (and any in use); returns what went."""
    if not CACHE.is_dir():
        return []
    series: dict[tuple[int, ...], list[str]] = {}
    for p in CACHE.iterdir():
        if p.is_dir() and not p.name.startswith("."):
            series.setdefault(release_key(p.name)[:2], []).append(p.name)
    gone = []
    for names in series.values():
        for name in sorted(names, key=release_key, reverse=True)[per_series:]:
            if name not in in_use:
                shutil.rmtree(CACHE / name, ignore_errors=True)
                gone.append(name)
    return gone
