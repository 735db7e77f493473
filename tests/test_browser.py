"""The app in a real browser: Debian's Chromium driven by Playwright for Python.

The app runs as `python app.py` in a subprocess on a free local port, on the tiny model folder
built by conftest.build_tiny_assets. Screenshots go to artifacts/screenshots/.
Needs: `apt-get install -y chromium` and `pip install playwright` (never `playwright install`).
"""
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOTS = os.path.join(ROOT, "artifacts", "screenshots")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # skipped below with a reason
    sync_playwright = None

if sync_playwright is None:
    pytest.skip("playwright for Python is not installed (pip install playwright)", allow_module_level=True)
if not os.path.exists(CHROMIUM):
    pytest.skip(f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install -y chromium)",
                allow_module_level=True)

from conftest import EXAMPLE_SEED, build_tiny_assets  # noqa: E402

expect.set_options(timeout=60_000)  # a busy shared machine; assertions return as soon as they hold


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = build_tiny_assets(str(tmp_path_factory.getbasetemp() / "app_assets"))
    port = free_port()
    env = dict(os.environ, DTRAK_ASSETS=root, GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1",
               GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")  # one torch thread: the machine running the tests is shared
    log = tmp_path_factory.mktemp("server") / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    t0 = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.perf_counter() - t0 > 300:  # generous: a loaded 2-core machine imports slowly
                    pytest.fail(f"app.py did not answer within 300 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        print(f"\napp.py answered after {time.perf_counter() - t0:.1f} s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(server)
    # the Generate tab fills itself with seeds 0..15 on load
    expect(page.get_by_text("seed 15:")).to_be_visible()
    yield page
    context.close()


def shot(page, name: str) -> str:
    os.makedirs(SHOTS, exist_ok=True)
    path = os.path.join(SHOTS, f"{name}.png")
    page.screenshot(path=path, full_page=True)
    return path


def button(page, name):
    return page.get_by_role("button", name=name, exact=True)


def pick(page, label: str, option: str):
    page.get_by_label(label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()


def test_generate_select_sample_shows_proponents_and_histogram(page):
    page.get_by_label("Last seed").fill("7")
    button(page, "Generate").click()
    expect(page.get_by_text("seed 15:")).to_have_count(0)
    expect(page.get_by_text("seed 7:")).to_be_visible()
    shot(page, "01-generate")

    t0 = time.perf_counter()
    page.get_by_text("seed 3:").click()
    proponents = page.locator("#proponents")
    expect(proponents.get_by_text("#").first).to_be_visible()
    expect(page.locator("#histogram .js-plotly-plot")).to_be_visible()
    expect(page.locator("#class-mass .js-plotly-plot")).to_be_visible()
    print(f"\nclick -> proponents and histogram shown: {time.perf_counter() - t0:.2f} s")
    expect(page.get_by_role("tab", name="Attribute", selected=True)).to_be_visible()
    expect(page.get_by_text("Generated sample, seed 3").first).to_be_visible()
    assert proponents.locator("img").count() == 8
    assert page.locator("#histogram .js-plotly-plot .bars path").count() > 0  # the histogram drew bars

    button(page, "Compare").click()
    expect(page.get_by_text("Spearman rank correlation")).to_be_visible()
    expect(page.locator("#compare-a img").first).to_be_visible()
    shot(page, "02-attribute")


def test_journey_trak_then_gradient_methods_keep_working(page):
    """Journey-TRAK swaps the model's parameters while it computes; later gradient queries on other
    samples must still work (they once failed until the server restarted)."""
    page.get_by_text("seed 3:").click()
    expect(page.locator("#proponents").get_by_text("#").first).to_be_visible()
    pick(page, "Method", "journey-trak")
    expect(page.locator("#summary").get_by_text("journey-trak").first).to_be_visible()
    for method, seed in (("D-TRAK (square)", 5), ("TRAK (loss)", 6)):
        page.get_by_role("tab", name="Generate").click()
        page.get_by_text(f"seed {seed}:").click()
        expect(page.get_by_text(f"Generated sample, seed {seed}").first).to_be_visible()
        pick(page, "Method", method)
        expect(page.locator("#summary").get_by_text(method.split(" ")[0]).first).to_be_visible()
        expect(page.locator("#proponents").get_by_text("#").first).to_be_visible()
    expect(page.get_by_text("does not require grad")).to_have_count(0)
    expect(page.locator(".toast-body")).to_have_count(0)


def test_upload_bad_file_shows_message_then_good_image_attributes(page, tmp_path):
    page.get_by_role("tab", name="Attribute").click()
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is a text file, not an image")
    page.locator("#upload input[type=file]").set_input_files(str(bad))
    expect(page.get_by_text("Could not use notes.png: not a readable image file").first).to_be_visible()
    page.wait_for_timeout(500)  # let the message finish fading in
    shot(page, "03-upload-bad-file")

    from PIL import Image, ImageDraw
    img = Image.new("RGB", (120, 120), "white")
    ImageDraw.Draw(img).ellipse([30, 15, 90, 105], outline="black", width=14)  # a dark zero on white paper
    good = tmp_path / "zero.jpg"
    img.save(good)
    page.locator("#upload").get_by_role("button", name="Clear").click()
    page.locator("#upload input[type=file]").set_input_files(str(good))
    expect(page.get_by_text("Your image zero.jpg (inverted)").first).to_be_visible()
    expect(page.locator("#proponents").get_by_text("#").first).to_be_visible()
    shot(page, "04-upload-good-image")


def test_retrain_start_cancel_and_finish(page):
    page.get_by_role("tab", name="Counterfactual").click()
    # the precomputed example shows on first visit
    expect(page.get_by_text(f"Precomputed example: seed {EXAMPLE_SEED}")).to_be_visible()
    shot(page, "05-counterfactual-example")

    page.get_by_label("Target seed (set by clicking a sample)").fill("1002")
    pick(page, "Ranking B (side by side)", "none")
    button(page, "Remove and retrain").click()
    expect(page.locator("#cf-status").get_by_text("retraining").first).to_be_visible()  # progress shown
    shot(page, "06-retrain-running")
    button(page, "Cancel").click()
    expect(page.get_by_text("Cancelled: the retrain was stopped")).to_be_visible()
    shot(page, "07-retrain-cancelled")

    button(page, "Remove and retrain").click()
    expect(page.get_by_text("Seed 1002:")).to_be_visible(timeout=90_000)
    expect(page.locator("#cf-table")).to_contain_text("D-TRAK (square)")
    shot(page, "08-retrain-done")


def test_benchmarks_empty_state_and_about(page):
    page.get_by_role("tab", name="Benchmarks").click()
    expect(page.get_by_text("No benchmark results yet")).to_be_visible()
    page.get_by_role("tab", name="About").click()
    expect(page.get_by_text("TRAK vs D-TRAK")).to_be_visible()
    expect(page.locator(".katex").first).to_be_visible()  # formulas rendered
    shot(page, "09-about")
