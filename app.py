"""The ddpo web UI: `python app.py` or `ddpo app`. Serves on 127.0.0.1:7860, offline, no analytics, no share link.

Tabs: compare rewards on generated or uploaded images; base vs finetuned on the same seeds; start, stop and watch
training runs; browse prompt grammars; steering. The UI lives in `ddpo/ui/`; it calls the same functions as the CLI.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpo app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; "
                             "0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--runs-dir", default="runs", help="where training runs and checkpoints live (default ./runs)")
    parser.add_argument("--model-dir", action="append", default=[], metavar="DIR",
                        help="a diffusers folder, or a folder of them, to offer in the model pickers (repeatable)")
    parser.add_argument("--model", default=None, help="the model selected at start (default: shapes if available)")
    parser.add_argument("--no-hub", action="store_true", help="refuse hub ids typed into the model box")
    parser.add_argument("--max-images", type=int, default=16, help="images per request (default 16)")
    parser.add_argument("--max-steps", type=int, default=100, help="denoising steps per image (default 100)")
    parser.add_argument("--concurrency", type=int, default=1, help="generation requests run at once (default 1)")
    return parser


def make_settings(args: argparse.Namespace):
    from ddpo.ui.settings import AppSettings, Limits

    return AppSettings(runs_dir=Path(args.runs_dir), model_dirs=[Path(d) for d in args.model_dir],
                       default_model=args.model, allow_hub=not args.no_hub,
                       limits=Limits(max_images=args.max_images, max_steps=args.max_steps),
                       generation_concurrency=args.concurrency)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    for flag, value, low in (("--max-images", args.max_images, 1), ("--max-steps", args.max_steps, 1),
                             ("--concurrency", args.concurrency, 1), ("--port", args.port, 1)):
        if value < low:
            print(f"ddpo app: {flag} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    # Before gradio is imported: it reads these at import time.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ddpo.ui import build_app

    settings = make_settings(args)
    demo = build_app(settings)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                    max_file_size=f"{settings.limits.max_upload_mb}mb", footer_links=["api"],
                    run_history=False)  # its history page can upload runs to a Hugging Face bucket
    except OSError as err:
        print(f"ddpo app: cannot listen on {args.host}:{args.port} ({err}); pass --port N", file=sys.stderr)
        return 1
    finally:
        demo.training.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
