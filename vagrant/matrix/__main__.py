"""python -m vagrant.matrix [--kernels "6.1 6.12"] [--no-host] …: the kernel matrix, offline.

Boots each Debian kernel under QEMU (TCG, no network device), runs `interlock doctor` and the
datapath suite inside, does the same on the host kernel, prints the tables and exits 1 on any
failure."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from vagrant.matrix import kernels, report, runner

DEFAULT_KERNELS = "6.1 6.12"
# Debian packages the runner needs on the host (the guest uses the host's own tools over 9p;
# kmod gives it /sbin/modprobe for the kernel's module autoload).
HOST_PACKAGES = {"qemu-system-x86_64": "qemu-system-x86", "busybox": "busybox-static", "depmod": "kmod",
                 "modprobe": "kmod", "unshare": "util-linux", "nsenter": "util-linux", "nft": "nftables",
                 "ip": "iproute2", "curl": "curl"}


def ensure_host_tools(log=print) -> None:
    missing = sorted({pkg for tool, pkg in HOST_PACKAGES.items() if shutil.which(tool) is None
                      and not Path(f"/sbin/{tool}").exists()})
    # busybox must be the static one: it runs alone in the initramfs
    static = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "busybox-static"], capture_output=True, text=True)
    if "install ok installed" not in static.stdout:
        missing.append("busybox-static")
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"kernel-matrix: missing {' '.join(missing)}; as root: apt-get install {' '.join(missing)}")
    log(f"kernel-matrix: installing {' '.join(sorted(set(missing)))}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *sorted(set(missing))]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"kernel-matrix: apt-get install failed: {r.stderr.strip()[-500:]}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vagrant.matrix", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", default=os.environ.get("KERNELS") or DEFAULT_KERNELS,
                    help="guest kernels: series (6.1, 6.12) or releases (6.1.0-47-amd64); default: %(default)s")
    ap.add_argument("--no-host", action="store_true", help="skip the row for the host's own kernel")
    ap.add_argument("--suite", default="auto",
                    help="auto (datapath once tests/test_datapath.py exists, else smoke); datapath (pytest -m "
                         "datapath tests/); kernel (only tests/test_datapath.py: the capture path); smoke (doctor "
                         "and program load only); sh:COMMAND; or pytest arguments")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MATRIX_JOBS", "1")),
                    help="guests booted side by side (default 1; 2 fits this 2-core machine with -smp 1)")
    ap.add_argument("--smp", type=int, default=0, help="guest CPUs (default: 2 when one guest at a time, else 1)")
    ap.add_argument("--mem", type=int, default=1024, help="guest memory in MB")
    ap.add_argument("--timeout", type=int, default=int(os.environ.get("MATRIX_TIMEOUT", "3600")),
                    help="seconds per guest, boot to power-off")
    ap.add_argument("--doc", type=Path, help="also write the tables into this Markdown file (docs/KERNELS.md)")
    ap.add_argument("--keep", action="store_true", help="keep each run's directory (console log, outputs)")
    ap.add_argument("--tolerate-timing", action="store_true",
                    help="in guests, failures of the tests in vagrant/matrix/timing_bound.txt do not fail the matrix")
    ap.add_argument("--download-only", action="store_true", help="fetch and unpack the kernels, boot nothing")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    if os.geteuid() != 0:
        print("kernel-matrix: run as root (guests are plain QEMU, but the host row loads BPF)", file=sys.stderr)
        return 2
    ensure_host_tools(log)
    specs = [s for s in args.kernels.replace(",", " ").split() if s and s != "host"]
    want_host = not args.no_host
    resolved = []
    for spec in specs:
        try:
            rel = kernels.resolve(spec)
            resolved.append((spec, kernels.fetch(rel, log=log)))
        except (kernels.KernelError, subprocess.CalledProcessError) as e:
            log(f"{spec}: {e}")
            resolved.append((spec, e))
    gone = kernels.prune([k.release for _, k in resolved if isinstance(k, kernels.Kernel)])
    if gone:
        log(f"kernel cache: removed older {' '.join(gone)}")
    if args.download_only:
        return 0 if all(isinstance(k, kernels.Kernel) for _, k in resolved) else 1
    smp = args.smp or (2 if args.jobs <= 1 else 1)
    t0 = time.monotonic()

    def one(item):
        spec, k = item
        if isinstance(k, Exception):
            return runner.Run(spec, error=str(k))
        return runner.run_guest(spec, k, args.suite, mem=args.mem, smp=smp, timeout=args.timeout,
                                keep=args.keep, log=log)

    runs: list[runner.Run] = []
    if want_host:
        runs.append(runner.run_host(args.suite, keep=args.keep, log=log))
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs.extend(pool.map(one, resolved))
    if args.tolerate_timing:
        for run in runs:
            if run.label != "host":
                runner.tolerate_timing(run)
    total = time.monotonic() - t0
    text = report.render(runs)
    print()
    print(text)
    for run in runs:
        if run.log:
            print(f"{run.label}: outputs kept in {run.log}")
    bad = [r.label for r in runs if not r.ok]
    print(f"kernel-matrix: {len(runs) - len(bad)} of {len(runs)} kernels passed in {total:.0f} s"
          + (f"; FAILED: {' '.join(bad)}" if bad else ""))
    rows = [r for run in runs for r in run.rows]
    failed = sum(r.result in ("FAIL", "ERROR") for r in rows) + sum(1 for run in runs if run.error)
    # the closing line CI reads: every (kernel, test) pair, the doctor included
    tolerated = sum(r.result == "tolerated" for r in rows)
    if tolerated:
        print(f"kernel-matrix: {tolerated} timing-bound failure(s) tolerated (vagrant/matrix/timing_bound.txt)")
    # the failures again, last, so that a log cut to its tail (CI keeps the tail) still names them
    for run in runs:
        if run.error:
            print(f"kernel-matrix: FAILED {run.label}: {' '.join(run.error.split())[:400]}")
        for r in run.rows:
            if r.result in ("FAIL", "ERROR"):
                print(f"kernel-matrix: FAILED {run.label} {r.test}: {' '.join(r.detail.split())[:400]}")
    print(f"kernel-matrix: {sum(r.result == 'pass' for r in rows)} passed, {failed} failed, "
          f"{sum(r.result == 'skip' for r in rows)} skipped")
    if args.doc:
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        extra = " ".join([*(["--no-host"] if args.no_host else []), *(["--jobs", str(args.jobs)] if args.jobs != 1 else []),
                          *(["--tolerate-timing"] if args.tolerate_timing else []),
                          *([f"--suite '{args.suite}'"] if args.suite != "auto" else [])])
        cmd = "make kernel-matrix KERNELS=\"" + " ".join(specs) + "\"" + (f' MATRIX_ARGS="{extra}"' if extra else "")
        report.update_doc(args.doc, runs, f"Measured {when} by `{cmd}` (suite: {args.suite}; guests: QEMU TCG, "
                                          f"-smp {smp}, {args.mem} MB; host: {os.uname().release}).")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
