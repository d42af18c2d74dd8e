"""A real headless Chromium (Debian's /usr/bin/chromium, driven through /usr/bin/chromedriver by
selenium) inside a lab host's network namespace, so it reaches only what that host reaches.

    with Browser(lab.b, trust=[rec.state / "server.crt"]) as br:
        br.do(lambda d: d.get(url))          # every WebDriver call runs inside the namespace

chromedriver listens on the host's loopback; `do` runs the call on a thread that entered the
namespace (lab.central.in_host), so selenium's own connections are made there too. `trust` lists
certificates whose public keys Chromium accepts for TLS (its --ignore-certificate-errors-spki-list),
instead of trusting anything."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lab.central import in_host
from lab.netns import Host
from lab.testing import SLOWDOWN, stop_process, wait_listening

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def spki_sha256(cert_pem: Path) -> str:
    cert = x509.load_pem_x509_certificate(Path(cert_pem).read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class Browser:
    def __init__(self, host: Host, trust: list[Path] = ()):
        self.host = host
        self.trust = list(trust)
        self.dir = Path(tempfile.mkdtemp(prefix="interlock-browser-"))
        self.port = random.randint(20000, 29999)
        self.proc: subprocess.Popen | None = None
        self.driver = None

    def start(self) -> Browser:
        from selenium import webdriver

        log = self.dir / "chromedriver.log"
        with open(log, "wb") as f:
            self.proc = self.host.popen([CHROMEDRIVER, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
                                        stdout=f, stderr=f, stdin=subprocess.DEVNULL, process_group=0)
        wait_listening(self.host, self.port, self.proc, log, timeout=30 * SLOWDOWN)
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-features=Translate,OptimizationHints,MediaRouter", f"--user-data-dir={self.dir / 'profile'}",
                  "--window-size=1280,1000"):
            opts.add_argument(a)
        if self.trust:
            opts.add_argument("--ignore-certificate-errors-spki-list=" + ",".join(spki_sha256(c) for c in self.trust))
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = in_host(self.host, webdriver.Remote, command_executor=f"http://127.0.0.1:{self.port}", options=opts)
        return self

    @staticmethod
    def wait(d, by, what: str, timeout: float = 15):
        """The element once the page shows it; the failure names the URL and what the page says."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(d, timeout * SLOWDOWN, poll_frequency=0.05).until(ec.presence_of_element_located((by, what)))
        except TimeoutException:
            raise AssertionError(f"no {what} on {d.current_url}: {d.find_element(By.TAG_NAME, 'body').text[:3000]}") from None

    def do(self, fn, *args, **kw):
        """fn(driver, *args, **kw) inside the host's namespace; its result."""
        return in_host(self.host, fn, self.driver, *args, **kw)

    def close(self) -> None:
        try:
            if self.driver is not None:
                in_host(self.host, self.driver.quit)
        except Exception:  # noqa: BLE001 -- the driver may already be gone; the process goes next
            pass
        finally:
            self.driver = None
            if self.proc is not None:
                stop_process(self.proc)
                try:  # Chromium's processes, should quit have failed (the group chromedriver leads: ours)
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                self.proc = None
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Browser:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
