"""The app on the text-to-image miniature in a real browser: `DTRAK_ASSETS=assets/text2image python app.py`
in a subprocess, driven by Debian's Chromium through Playwright. Type a prompt, generate, click a
sample, read its proponents; the phone layout. Screenshots go to artifacts/screenshots/ (git-ignored).
About 50 s (a server start), so it is marked slow: `pytest -m browser tests/text2image/test_text2image_browser.py`.
"""
import os

import numpy as np
import pytest
from browser_support import (
    DESKTOP,
    PHONE,
    ROOT,
    app_server,
    chromium,
    no_sideways_overflow,
    open_page,
    require_browser,
    sample,
    shot,
)

from dtrak_core.text2image.build import MINIATURE_ROOT
from dtrak_core.ui.text2image import BASELINES

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.slow]  # ~50 s: run with -m browser
_, expect = require_browser()
expect.set_options(timeout=90_000)  # a busy shared machine; assertions return as soon as they hold


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with app_server(MINIATURE_ROOT, tmp_path_factory.mktemp("server")) as url:  # relative to cwd=ROOT, as typed
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def test_prompt_generate_click_proponents_and_the_other_tabs(browser, server):
    page = open_page(browser, server, DESKTOP, timeout_ms=90_000)
    try:
        page.locator("#prompt textarea, #prompt input").first.fill("a handwritten digit 5")
        page.get_by_label("Last seed").fill("7")
        page.get_by_role("button", name="Generate", exact=True).click()
        expect(sample(page, 15)).to_have_count(0)
        expect(page.locator("#samples-note")).to_contain_text("a handwritten digit 5")
        shot(page, "t2i-1280x900-generate")
        sample(page, 3).click()
        expect(page.get_by_role("tab", name="Attribute", selected=True)).to_be_visible()
        expect(page.locator("#proponents [data-index]")).to_have_count(8)
        expect(page.locator("#query-info")).to_contain_text("Generated sample, seed 3")
        expect(page.locator("#query-prompt textarea, #query-prompt input").first).to_have_value("a handwritten digit 5")
        expect(page.locator("#summary")).to_contain_text("top proponents")
        expect(page.locator("#class-mass .js-plotly-plot")).to_be_visible()
        labels = page.locator("#proponents figcaption").all_inner_texts()
        assert sum("digit 5" in t for t in labels) >= 4, labels  # a prompted 5 comes mostly from fine-tuning 5s
        expect(page.locator("#noise-plot .js-plotly-plot .heatmaplayer")).to_have_count(1)
        shot(page, "t2i-1280x900-attribute")
        card = page.locator("#proponents [data-index]").nth(1)
        index = card.get_attribute("data-index")
        card.click()  # the drill-down: that fine-tuning image under every method
        expect(page.locator("#drill-details")).to_contain_text(f"Training image #{index}")
        # D-TRAK, TRAK and every text-to-image baseline of the registry (pixel, VAE latent, LoRA gradient)
        expect(page.locator("#drill-details tbody tr")).to_have_count(2 + len(BASELINES))
        expect(page.locator("#drill-details tbody")).to_contain_text("VAE latent RBF kernel")
        page.get_by_role("button", name="Compare", exact=True).click()
        expect(page.get_by_text("Spearman rank correlation")).to_be_visible()
        expect(page.locator("#compare-b [data-index]").first).to_be_visible()
        page.get_by_role("tab", name="Counterfactual").click()
        expect(page.locator("#cf-not-offered")).to_contain_text("not offered")
        page.get_by_role("tab", name="Benchmarks").click()
        expect(page.locator("#quality-table")).to_contain_text("88.5%")
        has_lds = os.path.isfile(os.path.join(ROOT, MINIATURE_ROOT, "lds", "lds_results.json"))
        expect(page.locator("#lds-status")).to_contain_text("D-TRAK, TRAK and the baselines" if has_lds else "not run yet")
        shot(page, "t2i-1280x900-benchmarks")
    finally:
        page.context.close()


def test_phone(browser, server):
    page = open_page(browser, server, PHONE, timeout_ms=90_000)
    try:
        assert no_sideways_overflow(page)
        shot(page, "t2i-phone-390x844-generate")
        sample(page, 2).click()
        expect(page.locator("#proponents [data-index]").first).to_be_visible()
        assert no_sideways_overflow(page)
        shot(page, "t2i-phone-390x844-attribute")
    finally:
        page.context.close()


def test_attribute_prompt_endpoint_equals_the_core(server):
    from gradio_client import Client

    from dtrak_core.text2image import TextToImageAttributor

    out = Client(server, verbose=False).predict("a handwritten digit 6", 2, 50, "d-trak", 5,
                                                api_name="/attribute_prompt")
    attributor = TextToImageAttributor.load(MINIATURE_ROOT)
    image = attributor.generate([2], "a handwritten digit 6")[0]
    expected = attributor.attribute(image, "d-trak", prompt="a handwritten digit 6")
    assert out["query"] == {"prompt": "a handwritten digit 6", "seed": 2, "steps": 50, "guidance": 3.0,
                            "label": out["query"]["label"]}
    assert [r["index"] for r in out["proponents"]] == expected.proponents(5).tolist()
    np.testing.assert_allclose([r["score"] for r in out["proponents"]], expected.scores[expected.proponents(5)],
                               rtol=1e-5)
    with pytest.raises(Exception, match="type a prompt"):
        Client(server, verbose=False).predict("  ", 2, 50, "d-trak", 5, api_name="/attribute_prompt")
