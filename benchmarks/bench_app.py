"""The app as a visitor meets it: start-up and click times in a real browser, against their goals.

    python benchmarks/bench_app.py                      # ./assets, 5 clicks
    python benchmarks/bench_app.py --clicks 8 --screenshots

`python app.py` is started in a subprocess (as `python app.py` on a 2-core machine: the server's
torch threads as it sets them), and headless Chromium (Debian's, driven by Playwright) opens the
page as soon as the server answers HTTP. Measured, in one run:

- **answers HTTP**: seconds from starting `python app.py` to its first HTTP answer; before it, the
  stages app.py logs by its own clock (libraries imported, model folder loaded and checked, serving);
- **page usable**: to the Generate tab showing its samples (the page fills itself on load), in a
  browser that was open (idle, for 3 s) before the server started and opened the page as soon as
  the server answered;
- **first click**: a sample clicked 3 s after the page became usable (a visitor looks first): time
  to its proponent cards and to both charts (histogram and per-class mass) drawn;
- **warm clicks**: further samples, each a new attribution on a warm server (median, max);
- **noise-level view**, **drill-down** after a click: a card clicked -> the image with the ranks of
  the methods computed so far (at once, unqueued), then -> its rank under every method;
- in this process, before the server starts: the core cost of the noise-level split
  (`app_support.noise_levels`, 10 timestep buckets) next to one plain attribution of the same
  query (featurize + score), warm, median over the queries.

Goals: page usable <= 10 s after `python app.py`; click to proponents and charts <= 1 s warm.
With --screenshots the Generate, Attribute, Counterfactual and Benchmarks tabs are saved at
1280x900, 1600x1000 and a 390x844 phone to artifacts/screenshots/ (git-ignored).
"""
from __future__ import annotations

from common import ROOT, machine_line  # first: before torch

# isort: split
import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]
GOALS = {"page usable": 10.0, "warm click -> proponents and charts": 1.0}
VIEWPORTS = ((1280, 900), (1600, 1000), (390, 844))
BROWSER_SETTLE = 3.0  # seconds between opening the browser and starting the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(assets: str, port: int, log: str) -> tuple[subprocess.Popen, float]:
    env = dict(os.environ, DTRAK_ASSETS=assets, GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1",
               GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
               GRADIO_TEMP_DIR=tempfile.mkdtemp(prefix="bench-app-gradio-"))
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, t0


def wait_http(proc, url: str, t0: float, log: str, timeout: float = 300) -> float:
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with {proc.returncode}:\n{open(log).read()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return time.perf_counter() - t0
        except OSError:
            if time.perf_counter() - t0 > timeout:
                raise SystemExit(f"app.py did not answer within {timeout:.0f} s:\n{open(log).read()[-3000:]}")
            time.sleep(0.05)


def stages(log: str) -> list[tuple[str, float]]:
    """The start-up stages app.py logs, with their seconds since it started (its own clock)."""
    found = re.findall(r"dtrak: (libraries imported|model folder loaded and checked|serving) \((\d+(?:\.\d+)?) s",
                       open(log).read())
    return [(name, float(t)) for name, t in found]


def click_sample(page, seed: int) -> dict:
    """Click one sample of the Generate tab; seconds to its cards, its charts and its noise-level view."""
    page.get_by_role("tab", name="Generate").click()
    caption = page.locator("#samples .caption-label", has_text=f"seed {seed}:")
    before = page.evaluate("() => document.querySelector('#summary')?.innerText || ''")  # (absent before a first click)
    t0 = time.perf_counter()
    caption.click()
    page.wait_for_function("([before]) => { const s = document.querySelector('#summary'); "
                           "return s && s.innerText !== before && document.querySelector('#proponents img'); }",
                           arg=[before])
    cards = time.perf_counter() - t0
    page.wait_for_function("() => document.querySelectorAll('#histogram .js-plotly-plot, #class-mass .js-plotly-plot')"
                           ".length === 2")
    charts = time.perf_counter() - t0
    page.locator("#noise-plot .js-plotly-plot").wait_for()
    page.wait_for_function("() => (document.querySelector('#noise-text') || {}).innerText?.includes('#')")
    noise = time.perf_counter() - t0
    return {"cards": cards, "charts": charts, "noise": noise}


def drill_down(page) -> tuple[float, float]:
    """(the image with the ranks known so far, every method's rank) seconds after a card click."""
    t0 = time.perf_counter()
    page.locator("#proponents [data-index]").nth(1).click()
    page.locator("#drill-details table").wait_for()
    first = time.perf_counter() - t0
    page.wait_for_function("() => { const t = document.querySelector('#drill-details table'); "
                           "return t && !t.innerText.includes('Computing'); }")
    return first, time.perf_counter() - t0


def core_costs(assets: str, n: int = 5) -> tuple[float, float]:
    """(attribution, noise-level split) seconds per query, warm, median over n generated samples."""
    from dtrak_core import app_support as sup
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.model.sampling import generate

    attributor = Attributor.load(assets)
    method = sup.method_choices(attributor.methods)[0][1]
    images = generate(attributor.unet, attributor.scheduler, list(range(100, 101 + n)), steps=50)
    attributor.scores(images[:1], method)
    sup.noise_levels(attributor, images[0], method)  # (first calls build the scorer and featurizer)
    plain, split = [], []
    for x in images[1:]:
        t0 = time.perf_counter()
        attributor.scores(x[None], method)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sup.noise_levels(attributor, x, method)
        split.append(time.perf_counter() - t0)
    return statistics.median(plain), statistics.median(split)


def screenshots(browser, url: str, folder: str) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for w, h in VIEWPORTS:
        phone = w < 500
        ctx = browser.new_context(viewport={"width": w, "height": h}, is_mobile=phone, has_touch=phone)
        page = ctx.new_page()
        page.set_default_timeout(120_000)
        page.goto(url)
        page.locator("#samples .caption-label").first.wait_for()
        name = f"default-model-{w}x{h}"
        for tab, ready in (("Generate", None), ("Attribute", "#noise-plot .js-plotly-plot"),
                           ("Counterfactual", "#cf-table"), ("Benchmarks", None)):
            if tab == "Attribute":
                page.locator("#samples .caption-label").nth(3).click()
            else:
                page.get_by_role("tab", name=tab).click()
            if ready:
                page.locator(ready).first.wait_for()
            page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # lazily loaded images load
            page.wait_for_timeout(1200)
            page.evaluate("window.scrollTo(0, 0)")
            path = os.path.join(folder, f"{name}-{tab.lower()}.png")
            page.screenshot(path=path, full_page=True)
            paths.append(path)
        ctx.close()
    return paths


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", default=os.path.join(ROOT, "assets"))
    p.add_argument("--clicks", type=int, default=5, help="warm clicks, each on another sample")
    p.add_argument("--screenshots", action="store_true")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    print(machine_line())
    plain, split = core_costs(args.assets)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = os.path.join(tempfile.mkdtemp(prefix="bench-app-"), "app.log")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(120_000)
        page.goto("about:blank")
        time.sleep(BROWSER_SETTLE)  # a visitor's browser is running already, not starting beside the server
        proc, t0 = start_server(args.assets, port, log)
        try:
            http = wait_http(proc, url, t0, log)
            page.goto(url)
            page.locator("#samples .caption-label", has_text="seed 15:").wait_for()
            usable = time.perf_counter() - t0
            page.wait_for_timeout(3000)
            first = click_sample(page, 3)
            warm = [click_sample(page, seed) for seed in (4, 5, 6, 7, 8, 9, 10, 11, 12, 13)[:args.clicks]]
            drill = drill_down(page)
            shots = screenshots(browser, url, os.path.join(ROOT, "artifacts", "screenshots")) if args.screenshots else []
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            browser.close()

    def med(key):
        return statistics.median(c[key] for c in warm), max(c[key] for c in warm)

    rows = [(f"  app.py's log: {name}", f"{t:.1f} s", "-") for name, t in stages(log)]
    rows += [("answers HTTP", f"{http:.1f} s", "-"),
            ("page usable (samples shown)", f"{usable:.1f} s", f"<= {GOALS['page usable']:.0f} s"),
            ("first click -> proponents", f"{first['cards']:.2f} s", "-"),
            ("first click -> proponents and charts", f"{first['charts']:.2f} s", "-"),
            ("warm click -> proponents (median, max)", "%.2f s, %.2f s" % med("cards"), "-"),
            ("warm click -> proponents and charts (median, max)", "%.2f s, %.2f s" % med("charts"),
             f"<= {GOALS['warm click -> proponents and charts']:.0f} s"),
            ("warm click -> noise-level view (median, max)", "%.2f s, %.2f s" % med("noise"), "~1 s"),
            ("card click -> the image, the ranks known so far", f"{drill[0]:.2f} s", "<= 1 s"),
            ("card click -> rank under every method", f"{drill[1]:.2f} s", "<= 1 s"),
            ("core: one attribution (featurize + score), warm", f"{plain:.2f} s", "-"),
            ("core: noise-level split (10 buckets), warm", f"{split:.2f} s ({split / plain:.1f}x)", "~1 s")]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':<{width}}  {'measured':>18}  goal")
    for name, value, goal in rows:
        print(f"{name:<{width}}  {value:>18}  {goal}")
    ok_usable = usable <= GOALS["page usable"]
    ok_click = med("charts")[0] <= GOALS["warm click -> proponents and charts"]
    print(f"\ngoals met: page usable {'yes' if ok_usable else 'no'}; warm click {'yes' if ok_click else 'no'}")
    for path in shots:
        print(f"screenshot: {os.path.relpath(path, ROOT)}")
    print(machine_line())


if __name__ == "__main__":
    main()
