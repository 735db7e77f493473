"""The one page in a real browser with two model folders of both kinds: the tiny pixel folder at /
and the committed text-to-image miniature on its own route, picked in the navigation bar, at desktop
and phone sizes. Needs Debian's Chromium and Playwright for Python (see browser_support)."""
import os

import pytest
from browser_support import DESKTOP, PHONE, app_server, chromium, no_sideways_overflow, open_page, require_browser

pytestmark = pytest.mark.browser
_, expect = require_browser()

from conftest import ASSETS, build_tiny_assets  # noqa: E402

T2I = os.path.join(ASSETS, "text2image")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not os.path.isfile(os.path.join(T2I, "manifest.json")):
        pytest.skip("the committed text-to-image folder is not in this checkout")
    root = build_tiny_assets(str(tmp_path_factory.getbasetemp() / "app_assets"))
    with app_server(f"{root}{os.pathsep}{T2I}", tmp_path_factory.mktemp("folders")) as url:
        yield url


@pytest.mark.parametrize("size", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_the_navigation_bar_picks_the_folder_and_each_page_works(server, size):
    with chromium() as browser:
        page = open_page(browser, server, size)  # the pixel folder's samples, at /
        nav = page.locator(".nav-holder, nav").first
        expect(nav.get_by_text("Text to image")).to_be_visible()
        expect(page.get_by_role("tab", name="Attribute")).to_be_visible()
        page.get_by_text("Text to image", exact=True).first.click()
        expect(page.get_by_label("Prompt")).to_be_visible()
        expect(page.locator("#samples img").first).to_be_visible(timeout=60_000)  # the miniature's own first samples (sampled on a busy machine)
        page.locator("#samples img").nth(2).click()  # a sample -> its attribution on the Attribute tab
        expect(page.locator("#proponents [data-index]").first).to_be_visible(timeout=120_000)  # LoRA gradients, on a busy machine
        if size == PHONE:
            assert no_sideways_overflow(page)
