"""Optional compiled builds of the hot sans-IO modules, with the pure-Python source as the fallback.

Every statement through the PostgreSQL relay runs the framing, the response tracker, the
handler, the analyzer's shape cache and the secret detectors: a few hundred Python calls, which
is most of the proxy's CPU per statement. Cython compiles these modules *as they are* (plain
Python, annotations ignored: the same semantics), which removes the interpreter's overhead
without a second implementation to keep in step.

`python scripts/compile.py build` (run by scripts/install.sh when Cython is installed) compiles
MODULES for the running interpreter and puts each extension next to its source, with a sidecar
`<module>.py.sha256` naming the exact source it was built from and the exact extension built
(both sha256). Python imports an extension before a source file of the same name; the finder
installed here (by policy/__init__.py, which every importer of these modules passes through)
turns that around whenever the extension Python would load is not known to match its source —
no sidecar, a different source hash (the source was edited or updated since), another extension
than the one stamped (replaced, or built for another interpreter, which rewrote the shared
stamp), an extension under another of the interpreter's suffixes (`.abi3.so`, `.so`), or one
beside a module of these packages that is no longer in MODULES — or when INTERLOCK_PURE_PYTHON
is set, so a stale build can never run. Without a build, everything runs from source as before.
`python scripts/compile.py status|clean`.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

MODULES = ("policy.detectors", "proxy.postgres.wire", "proxy.postgres.stream", "proxy.postgres.tracker",
           "proxy.postgres.analysis", "proxy.postgres.handler")
PURE_ENV = "INTERLOCK_PURE_PYTHON"
ROOT = Path(__file__).resolve().parent.parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]  # this interpreter's, e.g. .cpython-311-x86_64-linux-gnu.so


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stamp(source: Path) -> Path:
    return source.with_name(source.name + ".sha256")


def fresh(source: Path, built: Path | None = None) -> bool:
    """Whether `built` (default: this interpreter's extension next to `source`) was built from
    exactly this source: the stamp names both the source's and the extension's sha256."""
    built = built if built is not None else source.with_name(source.stem + SUFFIX)
    try:
        stamp = _stamp(source).read_text().split()
        return (len(stamp) == 2 and built.name.endswith(SUFFIX) and stamp[0] == _digest(source.read_bytes())
                and stamp[1] == _digest(built.read_bytes()))
    except OSError:
        return False


class SourceWhenStale(importlib.abc.MetaPathFinder):
    """Imports `names` from their .py source when the extension Python would load instead is
    stale (or the environment asks for pure Python); otherwise leaves the import to the normal
    finders. Any other module of the same packages with an extension beside its source is
    imported from source too: nothing outside `names` is ever built, so such a file is stale."""

    def __init__(self, names: tuple[str, ...] = MODULES):
        self.names = frozenset(names)
        self.packages = frozenset(n.rpartition(".")[0] for n in names)

    def find_spec(self, fullname: str, path, target=None):  # noqa: ANN001 - importlib's signature
        package, _, leaf = fullname.rpartition(".")
        if fullname not in self.names and package not in self.packages:
            return None
        for entry in path or sys.path:
            source = Path(entry) / f"{leaf}.py"
            # Python's own order: the first extension suffix present wins over the source
            built = next((b for b in (source.with_name(leaf + s) for s in importlib.machinery.EXTENSION_SUFFIXES)
                          if b.exists()), None)
            if not source.is_file():
                if built is not None:
                    return None  # no source here to fall back on: left to the normal finders
                continue
            if built is not None and (fullname not in self.names or os.environ.get(PURE_ENV)
                                      or not fresh(source, built)):
                return importlib.util.spec_from_file_location(fullname, source)
            return None
        return None


def install() -> None:
    if not any(isinstance(f, SourceWhenStale) for f in sys.meta_path):
        sys.meta_path.insert(0, SourceWhenStale())


def running_compiled() -> list[str]:
    """Those of MODULES imported so far that run from an extension."""
    return [m for m in MODULES if m in sys.modules and str(getattr(sys.modules[m], "__file__", "")).endswith(SUFFIX)]


def _source(name: str) -> Path:
    return ROOT.joinpath(*name.split(".")).with_suffix(".py")


def up_to_date() -> bool:
    return all(_source(n).with_name(_source(n).stem + SUFFIX).exists() and fresh(_source(n)) for n in MODULES)


def build(jobs: int = 2) -> list[str]:
    """Compile MODULES for this interpreter; raises when Cython or a C compiler is missing.
    Sources are copied first, so each stamp names the bytes that were compiled."""
    from Cython.Build import cythonize  # optional: pip install interlock[compiled]
    from setuptools import Distribution, Extension

    with tempfile.TemporaryDirectory(prefix="interlock-compile-") as tmp:
        src, digests, exts = Path(tmp) / "src", {}, []
        for name in MODULES:
            data = _source(name).read_bytes()
            copy = src.joinpath(*name.split(".")).with_suffix(".py")
            copy.parent.mkdir(parents=True, exist_ok=True)
            for pkg in copy.relative_to(src).parents:
                (src / pkg / "__init__.py").touch()
            copy.write_bytes(data)
            digests[name] = _digest(data)
            exts.append(Extension(name, [str(copy)]))
        modules = cythonize(exts, build_dir=str(Path(tmp) / "c"), quiet=True, nthreads=0,
                            compiler_directives={"language_level": 3, "binding": True, "annotation_typing": False})
        dist = Distribution({"ext_modules": modules, "script_name": "compiled.py"})
        cmd = dist.get_command_obj("build_ext")
        cmd.build_lib, cmd.build_temp, cmd.parallel = str(Path(tmp) / "lib"), str(Path(tmp) / "obj"), jobs
        cmd.ensure_finalized()
        cmd.run()
        done = []
        for name in MODULES:
            target = _source(name)
            built = target.with_name(target.stem + SUFFIX)
            partial = built.with_name(built.name + ".new")
            shutil.copyfile(cmd.get_ext_fullpath(name), partial)
            _stamp(target).unlink(missing_ok=True)  # never a new stamp beside an old extension
            os.replace(partial, built)
            _stamp(target).write_text(f"{digests[name]} {_digest(built.read_bytes())}\n")
            done.append(name)
        return done


def clean() -> None:
    for name in MODULES:
        source = _source(name)
        _stamp(source).unlink(missing_ok=True)
        source.with_name(source.stem + SUFFIX).unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "status"
    if what == "build":
        if up_to_date() and "--force" not in argv:
            print(f"compiled modules up to date for {sys.implementation.cache_tag}")
        else:
            print(f"compiled {len(build())} modules for {sys.implementation.cache_tag}: {', '.join(MODULES)}")
    elif what == "clean":
        clean()
    else:
        for name in MODULES:
            source = _source(name)
            built = source.with_name(source.stem + SUFFIX)
            state = "compiled" if built.exists() and fresh(source) else "stale build: source" if built.exists() else "source"
            print(f"{name:24} {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
