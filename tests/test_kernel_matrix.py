"""The kernel matrix runner's own parts, without booting anything (make kernel-matrix does that;
CI runs it after make test)."""

from __future__ import annotations

import gzip
from pathlib import Path

from vagrant.matrix import initramfs, kernels, report, runner


def _read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    out, off = {}, 0
    while True:
        assert data[off:off + 6] == b"070701"
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = data[off + 110: off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off: off + size]
        off += size
        off += -off % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_cpio_writer_makes_a_newc_archive_the_kernel_can_unpack():
    c = initramfs._Cpio()
    c.dir("bin")
    c.file("init", b"#!/bin/sh\n", 0o755)
    c.file("odd", b"12345")
    c.chardev("dev/console", 5, 1)
    files = _read_cpio(c.finish())
    assert files["init"] == (0o100755, b"#!/bin/sh\n")
    assert files["odd"][1] == b"12345"
    assert files["bin"][0] == 0o040755 and files["dev/console"][0] == 0o020600


def test_module_closure_loads_dependencies_first(tmp_path):
    mods = tmp_path / "lib" / "modules" / "6.1.0-1-amd64"
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text(
        "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\n"
        "kernel/net/9p/9pnet.ko:\nkernel/fs/netfs/netfs.ko:\n"
        "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_ring.ko:\nkernel/fs/overlayfs/overlay.ko:\n")
    (mods / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/char/hw_random/virtio-rng.ko\n")
    k = kernels.Kernel("6.1.0-1-amd64", tmp_path)
    order = [Path(m).name for m in initramfs._closure(k, initramfs.MODULES)]
    assert order.index("9pnet.ko") < order.index("9pnet_virtio.ko") < order.index("9p.ko")
    assert order.index("netfs.ko") < order.index("9p.ko") and "overlay.ko" in order
    assert len(order) == len(set(order))


def test_releases_sort_by_number_not_text():
    rels = ["6.1.0-9-amd64", "6.1.0-56-amd64", "6.12.9+deb12-amd64", "6.12.117+deb12-amd64"]
    assert sorted(rels, key=kernels.release_key)[-1] == "6.12.117+deb12-amd64"
    assert max(rels[:2], key=kernels.release_key) == "6.1.0-56-amd64"
    assert kernels.resolve("6.1.0-47-amd64") == "6.1.0-47-amd64"
    assert kernels._common("6.12.117+deb12-amd64") == "linux-headers-6.12.117+deb12-common"


def test_junit_rows_timing_bound_and_doc(tmp_path, monkeypatch):
    bound = tmp_path / "timing_bound.txt"
    bound.write_text("# why\ntest_gate.py::test_denied_by_a_human_and_timeout   a 3 s hold\n")
    monkeypatch.setattr(runner, "TIMING_BOUND", bound)
    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_datapath" name="test_a[ipv4]" time="1.5"/>'
        '<testcase classname="tests.test_gate" name="test_denied_by_a_human_and_timeout" time="9">'
        '<failure message="assert 2 == 0">x</failure></testcase>'
        '<testcase classname="tests.test_datapath" name="test_b" time="0.1"><skipped message="no"/></testcase>'
        '</testsuite></testsuites>')
    (tmp_path / "doctor.out").write_text("ok  root  yes\n\n8 of 8 checks passed\n")
    (tmp_path / "doctor.rc").write_text("0 1.0 3.5\n")
    (tmp_path / "tests.out").write_text("1 failed\n")
    (tmp_path / "tests.rc").write_text("1 4.0 20.0\n")
    run = runner.Run("6.1", release="6.1.0-56-amd64")
    runner.collect(run, tmp_path, runner.steps("datapath", str(tmp_path / "junit.xml")))
    assert [(r.test, r.result) for r in run.rows] == [
        ("interlock doctor", "pass"), ("test_datapath::test_a[ipv4]", "pass"),
        ("test_gate::test_denied_by_a_human_and_timeout", "FAIL"), ("test_datapath::test_b", "skip")]
    assert run.doctor == "8 of 8 checks passed" and not run.ok
    runner.tolerate_timing(run)
    assert run.rows[2].result == "tolerated"
    assert not run.ok, "a skipped kernel test counts as a failed one"
    run.rows.pop()
    assert run.ok
    doc = tmp_path / "KERNELS.md"
    doc.write_text(f"# Kernels\n\nprose\n\n{report.BEGIN}\nstale table\n{report.END}\n\nmore prose\n")
    report.update_doc(doc, [run], "Measured now.")
    text = doc.read_text()
    assert "prose" in text and "more prose" in text and "stale table" not in text
    assert "| 6.1 (6.1.0-56-amd64) | test_datapath::test_a[ipv4] | pass | 1.5 s |" in text


def test_initramfs_init_switch_roots_without_network():
    assert "switch_root" in initramfs.INIT and "chroot" not in initramfs.INIT
    argv = runner.qemu_argv(kernels.Kernel("6.1.0-1-amd64", Path("/x")), Path("/i"), Path("/j"), 1024, 1)
    assert argv[argv.index("-nic") + 1] == "none" and "-nodefaults" in argv
    assert "readonly=on" in next(a for a in argv if "mount_tag=hostroot" in a)
    assert gzip  # the initramfs is gzip'd cpio; see build()
