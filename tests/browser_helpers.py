"""Helpers for tests that drive a real server in headless Chromium (Selenium + the system chromedriver).

Offline by construction: Chromium resolves no host but 127.0.0.1 / localhost, background networking,
component updates and sync are off, and HOME, the profile and caches live in a fresh temp folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> tuple[str | None, str | None]:
    """``(chromium, chromedriver)`` executables on PATH (None where missing)."""
    browser = next((p for n in CHROMIUM_NAMES if (p := shutil.which(n))), None)
    return browser, shutil.which("chromedriver")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(home: Path) -> dict[str, str]:
    """The environment for a server or browser with HOME and caches under ``home`` and no phoning home."""
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
           "XDG_CONFIG_HOME": str(home / ".config"), "GRADIO_TEMP_DIR": str(home / "gradio"),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "SE_OFFLINE": "true", "PYTHONUNBUFFERED": "1", "no_proxy": "127.0.0.1,localhost"}
    return env


class Server:
    """``python -m ibllm serve ARGS --port PORT`` as a subprocess; stopped by :meth:`stop` (by its pid)."""

    def __init__(self, args: list[str], home: Path, timeout: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = home / "server.log"
        home.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "ibllm", "serve", *args, "--port", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=offline_env(home))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        """What the server printed so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Terminate the server process (then kill it if it lingers)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()


def chromium_flags(profile: Path) -> list[str]:
    """Headless, sandbox-less and offline Chromium flags with a fresh profile."""
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--disable-extensions", "--no-first-run", "--no-default-browser-check",
            "--metrics-recording-only", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
            f"--user-data-dir={profile}", f"--disk-cache-dir={profile / 'cache'}", "--window-size=1400,1300"]


def start_chromium(home: Path) -> Any:
    """A Selenium Chrome driver on the system Chromium + chromedriver, performance log on."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_browser()
    if not browser or not driver:
        raise RuntimeError("chromium / chromedriver not found")
    profile = home / "profile"
    profile.mkdir(parents=True, exist_ok=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in chromium_flags(profile):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    service = Service(executable_path=driver, env=offline_env(home), log_output=str(home / "chromedriver.log"))
    return webdriver.Chrome(service=service, options=opts)


def requested_urls(driver: Any) -> list[str]:
    """Every URL the page asked the network for since the last call (from the performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def foreign_urls(urls: list[str]) -> list[str]:
    """The URLs that are not served by this machine (data:/blob: and 127.0.0.1/localhost are local)."""
    out = []
    for url in urls:
        p = urlparse(url)
        if p.scheme in ("data", "blob", "about", "chrome", "devtools"):
            continue
        if p.hostname not in ("127.0.0.1", "localhost"):
            out.append(url)
    return out
