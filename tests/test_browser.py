"""The app in a real browser: Debian's Chromium driven by Playwright for Python.

The app runs as `python app.py` in a subprocess on a free local port, on the tiny model folder
built by conftest.build_tiny_assets; one server and one browser serve the whole module. Each flow
is checked at 1280x900 unless it says otherwise; the phone checks run at 390x844 and the
screenshots (artifacts/screenshots/, git-ignored) at 1280x900, 1600x1000 and 390x844.
Needs: `apt-get install -y chromium` and `pip install playwright` (never `playwright install`).
"""
import os
import re
import time

import pytest
from browser_support import (
    PHONE,
    SHOTS,
    WIDE,
    app_server,
    chromium,
    no_sideways_overflow,
    open_page,
    require_browser,
    sample,
    shot,
)

pytestmark = pytest.mark.browser
_, expect = require_browser()

from conftest import EXAMPLE_SEED, build_tiny_assets  # noqa: E402

from dtrak_core.checksums import write_sealed_json  # noqa: E402

expect.set_options(timeout=60_000)  # a busy shared machine; assertions return as soon as they hold
STALE = re.compile(r"\bstale\b")  # the class that dims a counterfactual result while a new one computes


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = build_tiny_assets(str(tmp_path_factory.getbasetemp() / "app_assets"))
    os.makedirs(os.path.join(root, "benchmarks"), exist_ok=True)  # an LDS result for the Benchmarks tab to chart
    cell = {"paper": {"lds": 30.0, "pm": 1.0}, "honest": {"lds": 28.0, "pm": 1.5}}
    write_sealed_json(os.path.join(root, "benchmarks", "lds_results.json"),  # sealed, as its writer writes it
                      {"methods": {"square": {"validation": cell, "generated": cell, "setting": {"K": 100}}}})
    with app_server(root, tmp_path_factory.mktemp("server")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server)
    yield page
    page.context.close()


def button(page, name):
    return page.get_by_role("button", name=name, exact=True)


def pick(page, label: str, option: str):
    page.get_by_label(label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()


def attribute_sample(page, seed: int):
    page.get_by_role("tab", name="Generate").click()
    sample(page, seed).click()
    expect(page.get_by_text(f"Generated sample, seed {seed}").first).to_be_visible()
    expect(page.locator("#proponents [data-index]").first).to_be_visible()


# ---------------------------------------------------------------- generate and attribute

def test_generate_select_attribute_compare_and_noise_levels(page):
    page.get_by_label("Last seed").fill("7")
    button(page, "Generate").click()
    expect(sample(page, 15)).to_have_count(0)
    expect(sample(page, 7)).to_be_visible()
    shot(page, "1280x900-generate")
    # captions sit under the pixels, not over them
    box_img = page.locator("#samples .thumbnail-item img").first.bounding_box()
    box_cap = page.locator("#samples .caption-label").first.bounding_box()
    assert box_cap["y"] >= box_img["y"] + box_img["height"] - 1

    t0 = time.perf_counter()
    sample(page, 3).click()
    expect(page.locator("#proponents [data-index]").first).to_be_visible()
    expect(page.locator("#histogram .js-plotly-plot")).to_be_visible()
    expect(page.locator("#class-mass .js-plotly-plot")).to_be_visible()
    print(f"\nclick -> proponents and charts: {time.perf_counter() - t0:.2f} s")
    expect(page.get_by_role("tab", name="Attribute", selected=True)).to_be_visible()
    expect(page.get_by_text("Generated sample, seed 3").first).to_be_visible()
    assert page.locator("#proponents [data-index]").count() == 8
    assert page.locator("#histogram .js-plotly-plot .bars path").count() > 0  # the histogram drew bars
    expect(page.locator("#summary")).to_contain_text("top proponents")
    # the noise-level view: a heatmap and the strongest image per timestep bucket
    expect(page.locator("#noise-plot .js-plotly-plot .heatmaplayer")).to_have_count(1)
    expect(page.locator("#noise-cards [data-index]").first).to_be_visible()
    expect(page.locator("#noise-text")).to_contain_text("At low noise")
    shot(page, "1280x900-attribute")

    button(page, "Compare").click()
    expect(page.get_by_text("Spearman rank correlation")).to_be_visible()
    expect(page.locator("#compare-a [data-index]").first).to_be_visible()
    before = page.locator("#compare-a").inner_html()
    # the comparison follows the query
    attribute_sample(page, 5)
    page.wait_for_function("([b]) => document.querySelector('#compare-a').innerHTML !== b", arg=[before])
    # typing a top-k and pressing Enter applies it
    box = page.locator("#topk input[type=number]")
    box.fill("5")
    box.press("Enter")
    expect(page.locator("#proponents [data-index]")).to_have_count(5)
    assert no_sideways_overflow(page)


def test_a_card_opens_the_training_image_under_every_method_and_becomes_the_query(page):
    attribute_sample(page, 3)
    card = page.locator("#proponents [data-index]").nth(1)
    index = card.get_attribute("data-index")
    card.click()
    details = page.locator("#drill-details")
    expect(details.get_by_text(f"Training image #{index}")).to_be_visible()
    expect(details.locator("tbody tr").first).to_be_visible()
    rows = details.locator("tbody tr")
    assert rows.count() >= 4  # D-TRAK, TRAK and the baselines that run on the tiny folder
    expect(details.locator("tbody")).to_contain_text("D-TRAK")
    expect(details.locator("tbody")).to_contain_text("of ")
    expect(details.locator("tbody")).not_to_contain_text("Computing")  # every method's rank filled in after
    shot(page, "1280x900-drill-down")
    button(page, "Use as query").click()
    expect(page.get_by_text(f"Training image #{index}").first).to_be_visible()
    expect(page.locator("#drill")).to_be_hidden()
    # a training image is its own strongest proponent under D-TRAK
    expect(page.locator("#proponents [data-index]").first).to_have_attribute("data-index", index)


def test_switching_methods_quickly_ends_on_the_last_one(page):
    attribute_sample(page, 3)
    for method in ("TRAK", "Pixel cosine", "D-TRAK", "TRAK"):
        pick(page, "Method", method)
    ends_on_trak = re.compile(r"^\s*TRAK: ")  # the summary names its method first ('D-TRAK: ...' is not it)
    expect(page.locator("#summary")).to_have_text(ends_on_trak)
    page.wait_for_timeout(1500)
    expect(page.locator("#summary")).to_have_text(ends_on_trak)
    assert page.locator(".toast-body").count() == 0


def test_a_mistake_in_generate_keeps_the_samples(page):
    page.get_by_label("Last seed").fill("-3")
    button(page, "Generate").click()
    expect(page.locator(".toast-body").first).to_contain_text("last seed must be a whole number")
    expect(sample(page, 15)).to_be_visible()


# ---------------------------------------------------------------- uploads

def test_uploads_bad_file_polarity_and_examples(page, tmp_path):
    page.get_by_role("tab", name="Attribute").click()
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is a text file, not an image")
    page.locator("#upload input[type=file]").set_input_files(str(bad))
    expect(page.get_by_text("Could not use notes.png: not a readable image file").first).to_be_visible()
    expect(page.locator("#upload").get_by_text("notes.png")).to_have_count(0)  # the refused file is not kept
    shot(page, "1280x900-upload-refused")

    from PIL import Image, ImageDraw
    img = Image.new("RGB", (120, 120), "white")
    ImageDraw.Draw(img).ellipse([30, 15, 90, 105], outline="black", width=14)  # a dark zero on white paper
    paper = tmp_path / "zero.jpg"
    img.save(paper)
    page.locator("#upload input[type=file]").set_input_files(str(paper))
    expect(page.get_by_text("Your image zero.jpg (inverted)").first).to_be_visible()
    expect(page.locator("#query-info")).to_contain_text("dark ink on light paper: inverted")
    expect(page.locator("#invert input")).to_be_checked()
    expect(page.locator("#proponents [data-index]").first).to_be_visible()
    shot(page, "1280x900-upload-on-paper")

    # the training digits' own polarity (light ink on black) is used as it is
    Image.eval(img, lambda v: 255 - v).save(tmp_path / "zero-light.png")
    page.locator("#upload").get_by_role("button", name="Clear").click()
    page.locator("#upload input[type=file]").set_input_files(str(tmp_path / "zero-light.png"))
    expect(page.get_by_text("Your image zero-light.png, as the model sees it").first).to_be_visible()
    expect(page.locator("#invert input")).not_to_be_checked()

    page.locator("#example-uploads").get_by_text("a 2 drawn on paper").click()
    expect(page.get_by_text("Your image drawn-2.png (inverted)").first).to_be_visible()
    expect(page.locator("#proponents [data-index]").first).to_be_visible()


# ---------------------------------------------------------------- counterfactual

def test_retrain_estimate_progress_cancel_and_finish(page):
    page.get_by_role("tab", name="Counterfactual").click()
    expect(page.get_by_text(f"Precomputed example: seed {EXAMPLE_SEED}")).to_be_visible()
    expect(page.locator("#cf-shown")).to_contain_text(f"Shown: seed {EXAMPLE_SEED}")
    examples = page.locator("#cf-examples")
    expect(examples).to_contain_text("ranking A: pixel L2, digit")
    expect(examples).to_contain_text("→")  # the digit before -> after of each example
    # random removal beside the ranking by default: one L2 alone says nothing
    expect(page.get_by_label("Ranking B (side by side; each one is a retrain)")).to_have_value("Random")
    shot(page, "1280x900-counterfactual")

    page.get_by_label("Target seed (set by clicking a sample)").fill("1002")
    page.get_by_label("Target seed (set by clicking a sample)").press("Enter")
    expect(page.locator("#cf-estimate")).to_contain_text("2 retrains")  # its cost stated
    pick(page, "Ranking B (side by side; each one is a retrain)", "none")  # one retrain, to keep the test short
    expect(page.locator("#cf-estimate")).to_contain_text("One retrain takes about")
    button(page, "Remove and retrain").click()
    expect(page.locator("#cf-progress").get_by_text("retraining").first).to_be_visible()  # the progress bar
    expect(page.locator("#cf-results")).to_have_class(STALE)  # the old result dimmed
    page.screenshot(path=os.path.join(SHOTS, "1280x900-retrain-running.png"), full_page=True)  # (quick: it is running)
    button(page, "Cancel").click()
    expect(page.get_by_text("Cancelled: the retrain was stopped")).to_be_visible()
    expect(page.locator("#cf-results")).not_to_have_class(STALE)
    expect(page.locator("#cf-shown")).to_contain_text(f"Shown: seed {EXAMPLE_SEED}")  # says what the pictures are
    shot(page, "1280x900-retrain-cancelled")

    button(page, "Remove and retrain").click()
    expect(page.get_by_text("Seed 1002:")).to_be_visible(timeout=120_000)
    expect(page.locator("#cf-table")).to_contain_text("D-TRAK")
    expect(page.locator("#cf-shown")).to_contain_text("Shown: seed 1002")
    expect(page.locator("#cf-results")).not_to_have_class(STALE)
    shot(page, "1280x900-retrain-done")


def test_benchmarks_chart_drawn_when_shown_and_about(page):
    page.get_by_role("tab", name="Benchmarks").click()
    expect(page.get_by_text("LDS x 100 (higher is better)").first).to_be_visible()
    expect(page.locator(".js-plotly-plot .bars path").first).to_be_visible()  # drawn on first showing the tab
    page.get_by_role("tab", name="About").click()
    expect(page.get_by_text("TRAK vs D-TRAK")).to_be_visible()
    expect(page.locator(".katex").first).to_be_visible()  # formulas rendered
    row = page.locator("tr", has_text="Relative IP")
    expect(row).to_contain_text("(Barshan et al.)")  # the description is not cut at its '||'
    shot(page, "1280x900-about")


# ---------------------------------------------------------------- phone and screenshots

def test_phone_every_tab_reachable_nothing_sideways(browser, server):
    page = open_page(browser, server, PHONE)
    try:
        tabs = page.get_by_role("tab")
        assert [tabs.nth(i).inner_text() for i in range(tabs.count())] == [
            "Generate", "Attribute", "Counterfactual", "Benchmarks", "About"]
        expect(page.locator("button[aria-label='More tabs']")).to_have_count(0)
        # every sample inside the screen: four columns, no hidden ones
        right = page.evaluate("Math.max(...[...document.querySelectorAll('#samples .thumbnail-item')]"
                              ".map(e => e.getBoundingClientRect().right))")
        assert right <= PHONE[0]
        assert no_sideways_overflow(page)
        shot(page, "phone-390x844-generate")
        sample(page, 3).click()
        expect(page.locator("#proponents [data-index]").first).to_be_visible()
        expect(page.locator("#noise-plot .js-plotly-plot")).to_be_visible()
        assert no_sideways_overflow(page)
        shot(page, "phone-390x844-attribute")
        for tab in ("Counterfactual", "Benchmarks", "About"):
            page.get_by_role("tab", name=tab).click()
            expect(page.get_by_role("tab", name=tab, selected=True)).to_be_visible()
            page.wait_for_timeout(500)
            assert no_sideways_overflow(page), tab
            shot(page, f"phone-390x844-{tab.lower()}")
        table = page.locator("#cf-table")
        page.get_by_role("tab", name="Counterfactual").click()
        box = table.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE[0] + 1  # the results table fits the screen
    finally:
        page.context.close()


def test_wide_screen(browser, server):
    """1600x1000 (the 1280x900 screenshots come from the tests above)."""
    size = WIDE
    page = open_page(browser, server, size)
    try:
        name = f"{size[0]}x{size[1]}"
        shot(page, f"{name}-generate")
        sample(page, 3).click()
        expect(page.locator("#noise-plot .js-plotly-plot")).to_be_visible()
        assert no_sideways_overflow(page)
        shot(page, f"{name}-attribute")
        for tab in ("Counterfactual", "Benchmarks"):
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(800)
            shot(page, f"{name}-{tab.lower()}")
    finally:
        page.context.close()
