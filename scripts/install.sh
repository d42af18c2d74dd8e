#!/usr/bin/env bash
# Idempotent install for a Debian 12 host, as root: Debian packages, the kernel headers link bcc
# needs, and a venv on Debian's python3 (where bcc lives) with the project installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(bpfcc-tools python3-bpfcc nftables python3-nftables iproute2 util-linux bpftool
      linux-headers-amd64 python3-venv python3-dev gcc curl
      postgresql postgresql-contrib pgbouncer haproxy iperf3 sqlite3 nginx wrk ca-certificates
      chromium chromium-driver)  # headless Chromium for the approval page tests (tests/test_web.py)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install: Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # nginx is for the lab's own servers (in namespaces); the packaged service is not ours to run.
  if [[ " ${missing[*]} " == *" nginx "* ]] && command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
    systemctl disable --now nginx >/dev/null 2>&1 || true
  fi
fi

# bcc compiles against /lib/modules/$(uname -r)/build. When this kernel's own headers are not
# packaged, point at Debian's newest headers: the programs use uapi types only.
kdir=/lib/modules/$(uname -r)
if [ ! -e "$kdir/build/Makefile" ] && [ ! -e "$kdir/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)
  if [ -n "$hdr" ]; then
    mkdir -p "$kdir"
    ln -sfn "$hdr" "$kdir/build"
    ln -sfn "${common:-$hdr}" "$kdir/source"
    echo "install: linked $kdir/build -> $hdr (no exact headers for $(uname -r))"
  fi
fi

# PostgreSQL's packaged cluster is not used: tests and demo start their own servers.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
log=$(mktemp)
if ! .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' >"$log" 2>&1; then
  grep -v '^WARNING: Location' "$log" >&2
  rm -f "$log"
  echo "install: pip could not install the project into .venv (messages above); fix and run make install again" >&2
  exit 1
fi
rm -f "$log"
# Optional: the PostgreSQL relay's hot modules compiled with Cython for this interpreter (policy/compiled.py).
# Anything failing here leaves them as pure Python, which behaves the same, only slower.
log=$(mktemp)
if { .venv/bin/python -c 'import Cython' 2>/dev/null || .venv/bin/pip install -q --disable-pip-version-check -e '.[compiled]'; } >"$log" 2>&1 \
    && .venv/bin/python scripts/compile.py build >"$log" 2>&1; then
  echo "install: $(tail -n1 "$log")"
else
  echo "install: hot modules not compiled, running them as pure Python ($(grep -v '^\s*$' "$log" | tail -n1 | cut -c1-160))"
fi
rm -f "$log"
ln -sfn "$PWD/.venv/bin/interlock" /usr/local/bin/interlock
# The default instance's interception CA (key root-only in /var/lib/interlock/ca), trusted
# system-wide so HTTPS agents enrolled by selector trust the proxy's leaves too.
.venv/bin/python -m proxy.tls.trust install
echo "install: ready ($(.venv/bin/interlock --help >/dev/null && echo 'interlock on PATH'))"
