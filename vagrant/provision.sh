#!/usr/bin/env bash
# Vagrant provisioner 1 (as root in the box): the distribution's bcc, nftables with its Python
# bindings, iproute2, the newest kernel of the distribution and its matching headers, a Python
# >= 3.11 for the venv. The Vagrantfile reboots the machine afterwards, so the suite runs on a
# kernel whose headers are installed (boxes often ship a kernel whose headers left the archive).
set -euo pipefail
family=${1:?usage: provision.sh debian|ubuntu|fedora}
export DEBIAN_FRONTEND=noninteractive

case "$family" in
  debian)
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
      linux-image-amd64 linux-headers-amd64 \
      bpfcc-tools python3-bpfcc nftables python3-nftables iproute2 util-linux curl \
      python3 python3-venv python3-dev gcc rsync
    ;;
  ubuntu)
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
      linux-generic linux-headers-generic \
      bpfcc-tools python3-bpfcc nftables python3-nftables iproute2 util-linux curl gcc rsync
    # Interlock needs Python >= 3.11: 22.04's python3 is 3.10, so its python3.11 runs the venv
    # (Ubuntu's Pythons all read /usr/lib/python3/dist-packages, where bcc and nftables live).
    if python3 -c 'import sys; sys.exit(sys.version_info >= (3, 11))'; then
      apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv python3.11-dev
    else
      apt-get install -y -qq --no-install-recommends python3-venv python3-dev
    fi
    ;;
  fedora)
    dnf -y -q install bcc bcc-tools python3-bcc nftables python3-nftables iproute util-linux curl \
      python3 python3-devel gcc rsync
    # the newest kernel and the kernel-devel (headers) of that same kernel, booted after the reboot
    dnf -y -q upgrade --refresh kernel kernel-core kernel-modules
    dnf -y -q install "kernel-devel-$(rpm -q --last kernel-core | head -1 | awk '{print $1}' | sed 's/^kernel-core-//')"
    ;;
  *)
    echo "provision.sh: unknown family $family" >&2
    exit 2
    ;;
esac

# cgroup v2 only (all four boxes already boot that way; this keeps it so)
if ! grep -q cgroup2 /proc/mounts; then
  echo "provision.sh: warning: no cgroup2 mount; Interlock needs the unified hierarchy" >&2
fi
echo "provision.sh: $family ready; rebooting into the newest kernel ($(ls /boot/vmlinuz-* | sort -V | tail -1))"
