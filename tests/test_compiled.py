"""policy.compiled: a compiled build runs only when it was built from the source beside it.

The guard is what keeps an optional Cython build safe: an edited or updated source must never
be shadowed by an old extension. These tests stand a fake extension (bytes that cannot load)
beside a real source: importing it fails exactly when the guard would let the extension run."""

from __future__ import annotations

import hashlib
import importlib.machinery
import subprocess
import sys
import textwrap
from pathlib import Path

from policy import compiled

PROBE = textwrap.dedent("""
    import importlib, sys
    from policy.compiled import SourceWhenStale
    sys.meta_path.insert(0, SourceWhenStale(("hotpkg.hot",)))
    sys.path.insert(0, sys.argv[1])
    try:
        mod = importlib.import_module(sys.argv[2])
    except ImportError as e:
        print("extension:", e)
    else:
        print("source:", mod.ANSWER)
""")
FAKE = b"not an ELF object: loading this fails"


def _package(tmp_path: Path, stamp: str | None) -> Path:
    pkg = tmp_path / "hotpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    source = pkg / "hot.py"
    source.write_text("ANSWER = 42\n")
    (pkg / ("hot" + compiled.SUFFIX)).write_bytes(FAKE)
    if stamp is not None:
        (pkg / "hot.py.sha256").write_text(stamp + "\n")
    return source


def _stamp_as_built(source: Path, extension: bytes = FAKE) -> None:
    """The stamp a build writes: the source's sha256 and the extension's."""
    digests = (hashlib.sha256(source.read_bytes()).hexdigest(), hashlib.sha256(extension).hexdigest())
    (source.parent / "hot.py.sha256").write_text(" ".join(digests) + "\n")


def _probe(tmp_path: Path, module: str = "hotpkg.hot", **env: str) -> str:
    repo = Path(compiled.__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), module], capture_output=True, text=True,
                       timeout=60, env={"PYTHONPATH": str(repo), **env})
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_an_extension_stamped_with_its_source_is_the_one_imported(tmp_path):
    source = _package(tmp_path, None)
    _stamp_as_built(source)
    assert compiled.fresh(source)
    assert _probe(tmp_path).startswith("extension:")  # the control: the guard lets a fresh build through


def test_an_extension_other_than_the_one_stamped_is_never_imported(tmp_path):
    # the stamp matches the source, but the extension beside it is not the one built with it:
    # replaced since, or an older build for this interpreter whose stamp a build for another
    # interpreter (same source file, same stamp file) rewrote
    source = _package(tmp_path, None)
    _stamp_as_built(source, extension=b"the extension that was built")
    assert not compiled.fresh(source)
    assert _probe(tmp_path) == "source: 42"


def test_an_extension_under_another_suffix_is_never_imported(tmp_path):
    # Python also loads hot.abi3.so and hot.so before hot.py; no build of ours makes them
    source = _package(tmp_path, None)
    (source.parent / ("hot" + compiled.SUFFIX)).unlink()
    for suffix in [s for s in importlib.machinery.EXTENSION_SUFFIXES if s != compiled.SUFFIX]:
        (source.parent / ("hot" + suffix)).write_bytes(FAKE)
        assert _probe(tmp_path) == "source: 42", suffix
        (source.parent / ("hot" + suffix)).unlink()


def test_a_module_no_longer_compiled_never_runs_its_old_extension(tmp_path):
    # a module of the same package that left MODULES (an update): its old build stays on disk
    # (build and clean only know MODULES), and must not shadow its source
    source = _package(tmp_path, None)
    (source.parent / "cold.py").write_text("ANSWER = 7\n")
    (source.parent / ("cold" + compiled.SUFFIX)).write_bytes(FAKE)
    assert _probe(tmp_path, "hotpkg.cold") == "source: 7"


def test_an_edited_source_is_imported_instead_of_its_old_extension(tmp_path):
    source = _package(tmp_path, hashlib.sha256(b"ANSWER = 41\n").hexdigest())
    assert not compiled.fresh(source)
    assert _probe(tmp_path) == "source: 42"


def test_an_extension_without_a_stamp_is_never_imported(tmp_path):
    _package(tmp_path, None)
    assert _probe(tmp_path) == "source: 42"


def test_pure_python_on_request(tmp_path):
    source = _package(tmp_path, None)
    _stamp_as_built(source)
    assert _probe(tmp_path, INTERLOCK_PURE_PYTHON="1") == "source: 42"


def test_the_guard_is_in_place_before_any_hot_module_is_imported():
    # policy/__init__.py installs it; proxy/postgres/__init__.py imports policy first.
    code = ("import sys, proxy.postgres; from policy.compiled import SourceWhenStale; "
            "assert any(isinstance(f, SourceWhenStale) for f in sys.meta_path); "
            "assert not [m for m in ('proxy.postgres.wire', 'policy.detectors') if m in sys.modules]; print('ok')")
    repo = Path(compiled.__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(repo)})
    assert r.stdout.strip() == "ok", r.stderr
