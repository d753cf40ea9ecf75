"""A real browser (Debian's chromium, driven by playwright) opens the app, generates, and sees the scores.

Needs the `chromium` apt package on PATH (never `playwright install`, which downloads a browser). Saves a screenshot
to test-artifacts/app_compare.png. Uses the shipped Shapes model when its weights are present, else tiny-random.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from localhost import launch_app

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (apt-get install -y chromium)")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    from ddpo.ui.pickers import shapes_available
    from ddpo.ui.settings import AppSettings

    model = "shapes" if shapes_available()[0] else "tiny-random"
    demo, port, env = launch_app(AppSettings(runs_dir=root / "runs", default_model=model), root)
    yield f"http://127.0.0.1:{port}/", model
    demo.close()
    env.undo()


def test_generate_and_see_scores_in_a_real_browser(app_url):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, model = app_url
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url, wait_until="domcontentloaded")
            page.get_by_role("tab", name="Compare rewards").wait_for(timeout=30_000)
            page.locator("#compare-go").click()
            # the scores table fills with one row per image (4 by default) and a column per reward
            scores = page.locator("#compare-scores")
            scores.get_by_text("jpeg_compressibility").first.wait_for(timeout=60_000)
            page.locator("#compare-gallery img").nth(3).wait_for(timeout=30_000)
            assert page.locator("#compare-gallery img").count() >= 4
            text = scores.inner_text()
            assert "jpeg_incompressibility" in text or "vlm_bertscore" in text
            if model == "shapes":  # the default rewards include the VLM reward with the Shapes captioner
                assert "vlm_bertscore" in text and "background" in page.locator("#compare-captions").inner_text()
            assert page.get_by_text("Traceback").count() == 0
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "app_compare.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "app_compare.png").stat().st_size > 10_000, model
