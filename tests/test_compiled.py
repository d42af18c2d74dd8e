"""policy.compiled: a compiled build runs only when it was built from the source beside it.

The guard is what keeps an optional Cython build safe: an edited or updated source must never
be shadowed by an old extension. These tests stand a fake extension (bytes that cannot load)
beside a real source: importing it fails exactly when the guard would let the extension run."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

from policy import compiled

PROBE = textwrap.dedent("""
    import sys
    from policy.compiled import SourceWhenStale
    sys.meta_path.insert(0, SourceWhenStale(("hotpkg.hot",)))
    sys.path.insert(0, sys.argv[1])
    try:
        import hotpkg.hot
    except ImportError as e:
        print("extension:", e)
    else:
        print("source:", hotpkg.hot.ANSWER)
""")


def _package(tmp_path: Path, stamp: str | None) -> Path:
    pkg = tmp_path / "hotpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    source = pkg / "hot.py"
    source.write_text("ANSWER = 42\n")
    (pkg / ("hot" + compiled.SUFFIX)).write_bytes(b"not an ELF object: loading this fails")
    if stamp is not None:
        (pkg / "hot.py.sha256").write_text(stamp + "\n")
    return source


def _probe(tmp_path: Path, **env: str) -> str:
    repo = Path(compiled.__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": str(repo), **env})
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_an_extension_stamped_with_its_source_is_the_one_imported(tmp_path):
    source = _package(tmp_path, None)
    (source.parent / "hot.py.sha256").write_text(hashlib.sha256(source.read_bytes()).hexdigest() + "\n")
    assert compiled.fresh(source)
    assert _probe(tmp_path).startswith("extension:")  # the control: the guard lets a fresh build through


def test_an_edited_source_is_imported_instead_of_its_old_extension(tmp_path):
    source = _package(tmp_path, hashlib.sha256(b"ANSWER = 41\n").hexdigest())
    assert not compiled.fresh(source)
    assert _probe(tmp_path) == "source: 42"


def test_an_extension_without_a_stamp_is_never_imported(tmp_path):
    _package(tmp_path, None)
    assert _probe(tmp_path) == "source: 42"


def test_pure_python_on_request(tmp_path):
    source = _package(tmp_path, None)
    (source.parent / "hot.py.sha256").write_text(hashlib.sha256(source.read_bytes()).hexdigest() + "\n")
    assert _probe(tmp_path, INTERLOCK_PURE_PYTHON="1") == "source: 42"


def test_the_guard_is_in_place_before_any_hot_module_is_imported():
    # policy/__init__.py installs it; proxy/postgres/__init__.py imports policy first.
    code = ("import sys, proxy.postgres; from policy.compiled import SourceWhenStale; "
            "assert any(isinstance(f, SourceWhenStale) for f in sys.meta_path); "
            "assert not [m for m in ('proxy.postgres.wire', 'policy.detectors') if m in sys.modules]; print('ok')")
    repo = Path(compiled.__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(repo)})
    assert r.stdout.strip() == "ok", r.stderr
