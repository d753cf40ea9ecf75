"""Refresh the screenshots of docs/app.md: the app on a temporary runs folder, driven by Debian's chromium.

    python docs/img/make_app_screenshots.py      # about a minute on a 2-core CPU; writes docs/img/app_*.png

Two tiny training runs (tiny_cpu, started from the Train tab, one overlaid on the other), a short steering run
(when the steering extra is installed), and one action per tab. Screenshots are scaled to 1100 px wide and
reduced to a 256-colour palette, so that each stays well under 200 KB.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def save(page, name: str) -> None:
    from PIL import Image

    raw = HERE / f"{name}.raw.png"
    page.screenshot(path=str(raw), full_page=True)
    with Image.open(raw) as im:
        im = im.convert("RGB")
        im = im.resize((1100, round(im.height * 1100 / im.width)), Image.LANCZOS)
        im.quantize(256, method=Image.Quantize.MEDIANCUT).save(HERE / f"{name}.png", optimize=True)
    raw.unlink()
    print(f"{name}.png: {(HERE / f'{name}.png').stat().st_size // 1024} KB")


def start_run(page, name: str, lr: str) -> None:
    page.locator("#train-name textarea, #train-name input").first.fill(name)
    page.locator("#train-extra textarea").fill(f"train.learning_rate={lr}\ntrain.num_epochs=6")
    page.locator("#train-start").click()
    page.locator("#train-status").get_by_text(f"{name}: finished, 6/6").wait_for(timeout=120_000)


def main() -> None:
    from localhost import launch_app
    from playwright.sync_api import sync_playwright

    from ddpo.ui.pickers import shapes_available
    from ddpo.ui.settings import AppSettings

    root = Path(tempfile.mkdtemp())
    runs = root / "runs"
    runs.mkdir()
    try:
        from ddpo.steering import cli as steering

        steering.main(["train", "--env", "Pendulum-v1", "--method", "dsrl_sac", "--steps", "600", "--warm-start-steps",
                       "100", "--eval-every", "100", "--eval-episodes", "2", "--checkpoint-every", "600",
                       "--no-video", "--runs-dir", str(runs), "--name", "pendulum-steer"])
    except ImportError:
        pass
    model = "shapes" if shapes_available()[0] else "tiny-random"
    demo, port, env = launch_app(AppSettings(runs_dir=runs, default_model=model), root)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("tab", name="Compare rewards").wait_for()
            page.locator("#compare-go").click()
            page.locator("#compare-cards .ddpo-card").nth(3).wait_for(timeout=60_000)
            save(page, "app_compare")

            page.get_by_role("tab", name="Train").click()
            box = page.locator("#train-preset input")
            box.click(), box.fill("tiny_cpu"), page.keyboard.press("Enter")
            time.sleep(1.0)
            start_run(page, "tiny-lr-0.001", "0.001")
            start_run(page, "tiny-lr-0.05", "0.05")
            overlay = page.locator("#train-overlay input")
            overlay.click(), overlay.fill("tiny-lr-0.001"), page.keyboard.press("Enter"), page.keyboard.press("Escape")
            time.sleep(3.0)
            save(page, "app_train")

            page.get_by_role("tab", name="Base vs finetuned").click()
            box = page.locator("#versus-model input")
            box.click(), box.fill("tiny-random"), page.keyboard.press("Enter")
            page.locator("#versus-go").click()
            page.locator(".ddpo-pair").nth(3).wait_for(timeout=60_000)
            save(page, "app_versus")

            page.get_by_role("tab", name="Prompts").click()
            page.locator("#prompts-sample").click()
            page.locator("#prompts-sampled").get_by_text("prompt").first.wait_for()
            time.sleep(1.0)
            save(page, "app_prompts")

            page.get_by_role("tab", name="Steering").click()
            if page.locator("#steer-go").count():
                box = page.locator("#steer-env input")
                box.click(), box.fill("Pendulum-v1"), page.keyboard.press("Enter")
                time.sleep(1.0)
                box = page.locator("#steer-run input")
                box.click(), box.fill("pendulum-steer"), page.keyboard.press("Enter")
                page.locator("#steer-go").click()
                page.locator("#steer-summary").get_by_text("Steered").wait_for(timeout=120_000)
                time.sleep(2.0)
            save(page, "app_steering")
            browser.close()
    finally:
        demo.training.stop()
        demo.close()
        env.undo()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
