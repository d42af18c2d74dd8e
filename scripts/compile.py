"""Compile the hot sans-IO modules with Cython, or show or remove the build: see policy/compiled.py.

usage: python scripts/compile.py [build|status|clean]"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from policy.compiled import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
