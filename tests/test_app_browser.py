"""A real browser (Debian's chromium, driven by playwright) checks what a person sees: generated images with their
scores; a short training run started from the Train tab with its curves drawn and its log's newest line in view;
the run, created after the page loaded, in the checkpoint pickers; base | finetuned pairs per seed.

Needs the `chromium` apt package on PATH (never `playwright install`, which downloads a browser). Saves screenshots
to test-artifacts/app_*.png. Uses the shipped Shapes model when its weights are present, else tiny-random (the
training run is `tiny_cpu` on tiny-random either way: seconds on a CPU).
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
    earlier = root / "runs" / "earlier"  # a finished run's folder (no checkpoint): listed in the Runs table
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text("train:\n  num_epochs: 3\n")
    (earlier / "metrics.jsonl").write_text("".join(f'{{"epoch": {e}, "reward_mean": {e / 10}}}\n' for e in (1, 2, 3)))
    demo, port, env = launch_app(AppSettings(runs_dir=root / "runs", default_model=model), root)
    yield f"http://127.0.0.1:{port}/", model, root / "runs"
    demo.close()
    env.undo()


def test_generate_and_see_scores_in_a_real_browser(app_url):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, model, _ = app_url
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
            cards = page.locator("#compare-cards .ddpo-card")
            cards.nth(3).wait_for(timeout=30_000)
            assert cards.count() == 4
            text = scores.inner_text()
            rewards = [r for r in ("jpeg_compressibility", "jpeg_incompressibility", "vlm_bertscore") if r in text]
            for i in range(4):  # every reward's score under each image, whole (not cut)
                card = cards.nth(i)
                assert card.locator("img").evaluate("i => i.complete && i.naturalWidth > 0")
                assert all(r in card.inner_text() for r in rewards) and f"seed {i}" in card.inner_text()
                assert card.evaluate("c => c.scrollWidth <= c.clientWidth + 1")
            assert "jpeg_incompressibility" in text or "vlm_bertscore" in text
            if model == "shapes":  # the default rewards include the VLM reward with the Shapes captioner
                assert "vlm_bertscore" in text and "background" in page.locator("#compare-captions").inner_text()
            assert page.get_by_text("Traceback").count() == 0
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "app_compare.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "app_compare.png").stat().st_size > 10_000, model


LINE_PIXELS = """(img) => {  // pixels of the first run's colour (#1f77b4) in the rendered curves
    const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext('2d'); g.drawImage(img, 0, 0);
    const d = g.getImageData(0, 0, c.width, c.height).data; let n = 0;
    for (let i = 0; i < d.length; i += 4)
        if (Math.abs(d[i] - 31) + Math.abs(d[i + 1] - 119) + Math.abs(d[i + 2] - 180) < 40) n++;
    return n;
}"""
LAST_LOG_LINE = """(box) => {  // the log's last line, and whether it lies inside the visible part of its box
    const pre = box.querySelector('pre'), text = pre.firstChild, range = document.createRange();
    range.setStart(text, Math.max(text.length - 1, 0)); range.setEnd(text, text.length);
    const line = range.getBoundingClientRect(), seen = box.getBoundingClientRect();
    const lines = pre.textContent.trimEnd().split('\\n');
    return {last: lines[lines.length - 1], visible: line.top >= seen.top - 1 && line.bottom <= seen.bottom + 1};
}"""


def wait_until(fn, timeout=20.0, every=0.5):
    import time

    deadline = time.time() + timeout
    while True:
        value = fn()
        if value or time.time() > deadline:
            return value
        time.sleep(every)


def pick(page, elem_id, value):
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(value)
    page.keyboard.press("Enter")


def test_train_watch_curves_log_and_compare_pairs_in_a_real_browser(app_url):
    """A person's path: start a short run on the Train tab of a page opened before the run existed, see its curves
    drawn and its log's last line, then compare it with the base model seed by seed."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from ddpo.ui.training import LOG_FILE, clean_log

    url, _, runs_dir = app_url
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="domcontentloaded")
            page.get_by_role("tab", name="Train").click()
            pick(page, "train-preset", "tiny_cpu")
            page.locator("#train-status").get_by_text("no run started").wait_for(timeout=10_000)
            page.wait_for_function("document.querySelector('#train-preset-note') !== null")
            name = page.locator("#train-name textarea, #train-name input").first
            name.fill("ui-browser")
            name.press("Enter")  # Enter starts, as the label says
            page.locator("#train-status").get_by_text("finished, 2/2 epochs").wait_for(timeout=60_000)
            # the curves: the reward line is drawn (pixels of the run's colour in the figure)
            img = page.locator("#train-curves img")
            assert wait_until(lambda: img.count() and img.first.evaluate(LINE_PIXELS) > 300), "no curve drawn"
            assert page.locator("#train-progress-bar progress").get_attribute("value") == "2"
            # the log box shows the run's last line (the newest), in view without scrolling
            expected = clean_log((runs_dir / "ui-browser" / LOG_FILE).read_text()).splitlines()[-1]
            log = wait_until(lambda: (lambda r: r if r["last"] == expected else None)(
                page.locator("#train-log .ddpo-log").evaluate(LAST_LOG_LINE)))
            assert log and log["visible"], log
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "app_train.png"), full_page=True)
            # clicking a run in the Runs table watches it
            page.locator("#train-runs").get_by_text("earlier", exact=True).click()
            page.locator("#train-status").get_by_text("earlier: finished, 3/3 epochs").wait_for(timeout=10_000)
            assert page.locator("#train-watch input").input_value() == "earlier"

            # Compare rewards: the LoRA picker, filled when the page loaded, now lists the new run
            page.get_by_role("tab", name="Compare rewards").click()
            page.locator("#compare-ckpt input").click()
            page.get_by_role("option", name="ui-browser", exact=True).wait_for(timeout=10_000)
            page.keyboard.press("Escape")

            # Base vs finetuned: the new run is preselected; each seed shows base | finetuned
            page.get_by_role("tab", name="Base vs finetuned").click()
            assert wait_until(lambda: page.locator("#versus-ckpt input").input_value() == "ui-browser", 10)
            pick(page, "versus-model", "tiny-random")
            page.locator("#versus-go").click()
            page.locator(".ddpo-pair").nth(3).wait_for(timeout=60_000)
            pairs = page.locator(".ddpo-pair")
            assert pairs.count() == 4
            for i in range(4):
                row = pairs.nth(i)
                assert row.locator("img").count() == 2 and f"seed {i}" in row.inner_text()
                assert all(im.evaluate("i => i.complete && i.naturalWidth > 0") for im in row.locator("img").all())
            assert "jpeg_compressibility" in pairs.first.inner_text()
            assert page.get_by_text("Traceback").count() == 0
            page.screenshot(path=str(ARTIFACTS / "app_versus.png"), full_page=True)
        finally:
            browser.close()
