"""Install-time trust: create an instance's interception CA and add it to the system trust store.

    python -m proxy.tls.trust install [--state-dir DIR] [--instance NAME]
    python -m proxy.tls.trust remove  [--instance NAME]

scripts/install.sh runs `install` for the default instance, so every program on the host that
reads the system store (/etc/ssl/certs, through update-ca-certificates) trusts the leaves the proxy
mints, including agents enrolled by selector, which `interlock run`'s variables never reach.
The key stays root-only in the state dir; only the certificate is copied. The proxy itself never
trusts this CA for upstream connections (proxy/tls/handler.py removes it from what it loads)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from proxy.tls.ca import CertificateAuthority

LOCAL_CAS = Path("/usr/local/share/ca-certificates")
DEFAULT_STATE_DIR = Path("/var/lib/interlock")


def anchor(instance: str) -> Path:
    return LOCAL_CAS / f"interlock-{instance}.crt"


def install(state_dir: Path, instance: str) -> CertificateAuthority:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    state_dir.chmod(0o700)
    ca = CertificateAuthority.load_or_create(state_dir / "ca")  # ca.key is written 0600
    LOCAL_CAS.mkdir(parents=True, exist_ok=True)
    dest = anchor(instance)
    if not dest.exists() or dest.read_bytes() != ca.cert_pem:
        dest.write_bytes(ca.cert_pem)
        dest.chmod(0o644)
        _update()
    return ca


def remove(instance: str) -> bool:
    dest = anchor(instance)
    if not dest.exists():
        return False
    dest.unlink()
    _update(fresh=True)
    return True


def _update(fresh: bool = False) -> None:
    if shutil.which("update-ca-certificates") is None:
        raise SystemExit("update-ca-certificates not found: apt-get install ca-certificates")
    subprocess.run(["update-ca-certificates", *(["--fresh"] if fresh else [])], check=True,
                   stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m proxy.tls.trust", description=__doc__.split("\n\n")[0])
    ap.add_argument("verb", choices=["install", "remove"])
    ap.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    ap.add_argument("--instance", default="default")
    args = ap.parse_args(argv)
    if args.verb == "install":
        ca = install(args.state_dir, args.instance)
        print(f"interception CA for instance {args.instance}: {args.state_dir / 'ca'} (sha256 {ca.fingerprint_sha256[:16]}…), "
              f"trusted system-wide via {anchor(args.instance)}")
    else:
        print(f"removed {anchor(args.instance)}" if remove(args.instance) else "nothing to remove")
    return 0


if __name__ == "__main__":
    sys.exit(main())
