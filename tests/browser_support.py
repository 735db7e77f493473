"""What the browser tests share: `python app.py` served on a free local port, Debian's Chromium
driven by Playwright for Python, pages at a viewport, screenshots.

Needs `apt-get install -y chromium` and `pip install playwright` (never `playwright install`):
`require_browser()` skips the calling module with the reason when either is missing.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOTS = os.path.join(ROOT, "artifacts", "screenshots")
DESKTOP, WIDE, PHONE = (1280, 900), (1600, 1000), (390, 844)


def require_browser():
    """Playwright's `sync_playwright` and `expect`, or skip the calling test module saying what is missing."""
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip("playwright for Python is not installed (pip install playwright)", allow_module_level=True)
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install -y chromium)",
                    allow_module_level=True)
    return sync_playwright, expect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_server(assets: str | None, log_dir, timeout: float = 300, cwd: str = ROOT):
    """`python app.py` in `cwd` on the model folder `assets` (one torch thread: the machine running
    the tests is shared); yields its URL once it answers HTTP, and stops it afterwards. assets None:
    the folder's own app alone, as a Space runs it (no $DTRAK_ASSETS, no $PYTHONPATH)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DTRAK_ASSETS")}
    if assets is not None:
        env = dict(os.environ, DTRAK_ASSETS=assets)
    env.update(GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    log = os.path.join(str(log_dir), "app.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    t0 = time.perf_counter()

    def tail() -> str:
        with open(log) as f:
            return f.read()[-3000:]
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{tail()}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.perf_counter() - t0 > timeout:  # generous: a loaded 2-core machine imports slowly
                    pytest.fail(f"app.py did not answer within {timeout:.0f} s:\n{tail()}")
                time.sleep(0.5)
        print(f"\napp.py answered after {time.perf_counter() - t0:.1f} s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def chromium():
    """A headless Chromium for the whole module."""
    sync_playwright, _ = require_browser()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def sample(page, seed: int):
    """The Generate tab's sample of one seed (its caption)."""
    return page.locator("#samples .caption-label", has_text=f"seed {seed}:")


def open_page(browser, url, size=DESKTOP, timeout_ms: int = 60_000):
    """A new page at this viewport (a phone's touch screen below 500 px wide), once the Generate tab
    has filled itself with seeds 0..15."""
    _, expect = require_browser()
    phone = size[0] < 500
    context = browser.new_context(viewport={"width": size[0], "height": size[1]}, is_mobile=phone, has_touch=phone)
    page = context.new_page()
    page.set_default_timeout(timeout_ms)
    page.goto(url)
    expect(sample(page, 15)).to_be_visible()
    return page


def shot(page, name: str) -> str:
    """A full-page screenshot, artifacts/screenshots/<name>.png."""
    os.makedirs(SHOTS, exist_ok=True)
    path = os.path.join(SHOTS, f"{name}.png")
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # lazily loaded images load
    page.wait_for_timeout(300)  # let fades finish
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=path, full_page=True)
    return path


def no_sideways_overflow(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
