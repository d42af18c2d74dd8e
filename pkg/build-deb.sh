#!/usr/bin/env bash
# `make deb`: a Debian package of Interlock, built with dpkg-deb from a staged tree.
#   /opt/interlock/venv       the project in a venv on Debian's python3 (system site packages: bcc)
#   /usr/bin/interlock        the CLI
#   /lib/systemd/system/interlock.service, /etc/interlock/config.yaml (a conffile)
# Usage: pkg/build-deb.sh [OUTDIR]   (default: dist/); prints the path of the .deb it wrote.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist}")
version=$(/usr/bin/python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')
arch=$(dpkg --print-architecture)
prefix=/opt/interlock
stage=$(mktemp -d /tmp/interlock-deb-XXXXXX)
trap 'rm -rf "$stage"' EXIT
venv="$stage$prefix/venv"

/usr/bin/python3 -m venv --system-site-packages "$venv"
# Build from a copy, so setuptools' build/ never lands in the work tree.
src="$stage.src"
trap 'rm -rf "$stage" "$src"' EXIT
mkdir -p "$src"
tar --exclude=./.venv --exclude=./.git --exclude=./dist --exclude=./build --exclude='*.egg-info' -cf - . | tar -xf - -C "$src"
log=$(mktemp)
if ! "$venv/bin/pip" install -q --disable-pip-version-check --no-compile "$src" >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"
  echo "build-deb: pip could not install the project into the package's venv (messages above)" >&2
  exit 1
fi
rm -f "$log"
# The venv was built under the staging dir: make every path in it the installed one.
grep -rlI --null "$stage" "$venv" | xargs -0 -r sed -i "s#$stage##g"
/usr/bin/python3 -m compileall -q -s "$stage" -p / "$venv/lib" >/dev/null

install -D -m 0644 pkg/interlock.service "$stage/lib/systemd/system/interlock.service"
install -D -m 0644 pkg/config.yaml "$stage/etc/interlock/config.yaml"
mkdir -p "$stage/usr/bin"
ln -s "$prefix/venv/bin/interlock" "$stage/usr/bin/interlock"
doc="$stage/usr/share/doc/interlock"
install -D -m 0644 README.md "$doc/README.md"
for f in docs/*.md; do install -m 0644 "$f" "$doc/"; done

mkdir -p "$stage/DEBIAN"
install -m 0755 pkg/postinst pkg/prerm pkg/postrm "$stage/DEBIAN/"
echo /etc/interlock/config.yaml > "$stage/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<CONTROL
Package: interlock
Version: $version
Architecture: $arch
Maintainer: Interlock developers <interlock@localhost>
Installed-Size: $size
Section: net
Priority: optional
Depends: python3 (>= 3.11), python3-venv, python3-bpfcc, bpfcc-tools, nftables, python3-nftables, iproute2, util-linux, linux-headers-amd64 | linux-headers-generic, ca-certificates
Description: transparent guardrails between AI agents and the services they touch
 A root daemon that captures every connection of enrolled agent processes with eBPF
 and nftables, and sends it through a local protocol-aware proxy that blocks, holds
 for approval, masks and records, failing closed.
CONTROL
mkdir -p "$out"
deb="$out/interlock_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zgzip --build "$stage" "$deb" >/dev/null
echo "$deb"
