"""The ddpo web UI: `python app.py` or `ddpo app`. Serves on 127.0.0.1:7860, offline, no analytics, no share link.

Tabs: compare rewards on generated or uploaded images; base vs finetuned on the same seeds; start, stop and watch
training runs; browse prompt grammars; steering. The UI lives in `ddpo/ui/`; it calls the same functions as the CLI.
Beyond loopback (--host 0.0.0.0, --share) the app needs a login: --auth-file or --auth-env.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any, Mapping

MIN_PASSWORD = 8


class LaunchError(ValueError):
    """A command line the app refuses to start with; the message says what to change."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpo app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; any other address, "
                             "e.g. 0.0.0.0, opens it to the network and needs --auth-file or --auth-env)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also open a public gradio.live link (off by default; needs --auth-file or --auth-env)")
    parser.add_argument("--auth-file", metavar="FILE",
                        help="logins, one 'user:password' per line ('#' comments); required beyond loopback")
    parser.add_argument("--auth-env", metavar="VAR",
                        help="the name of an environment variable holding 'user:password' (kept off the command "
                             "line, where other users of the machine can read it)")
    parser.add_argument("--reward-config", metavar="FILE",
                        help="YAML/JSON mapping reward name -> options, merged into every request: what the browser "
                             "may not set (an OpenAI-compatible captioner endpoint and its key variable, a remote "
                             "reward server, your own captioner class, model paths, devices); see docs/app.md")
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
    """AppSettings from the command line; a bad --reward-config is a LaunchError."""
    from ddpo.ui.reward_options import RewardConfigError, load_reward_config
    from ddpo.ui.settings import AppSettings, Limits

    try:
        reward_config = load_reward_config(args.reward_config) if args.reward_config else {}
    except RewardConfigError as err:
        raise LaunchError(str(err)) from None
    return AppSettings(runs_dir=Path(args.runs_dir), model_dirs=[Path(d) for d in args.model_dir],
                       default_model=args.model, allow_hub=not args.no_hub,
                       limits=Limits(max_images=args.max_images, max_steps=args.max_steps),
                       generation_concurrency=args.concurrency, reward_config=reward_config)


def is_loopback(host: str) -> bool:
    """True only for addresses that this machine alone can reach (127.0.0.0/8, ::1, "localhost")."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def read_logins(args: argparse.Namespace, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """The (user, password) pairs of --auth-file and --auth-env ([] when neither is given)."""
    lines: list[tuple[str, str]] = []
    if args.auth_file:
        try:
            text = Path(args.auth_file).read_text()
        except OSError as err:
            raise LaunchError(f"--auth-file {args.auth_file}: cannot read it ({err.strerror})") from None
        lines += [(f"--auth-file {args.auth_file}, line {i}", line.strip()) for i, line in
                  enumerate(text.splitlines(), 1) if line.strip() and not line.strip().startswith("#")]
        if not lines:
            raise LaunchError(f"--auth-file {args.auth_file} has no 'user:password' line")
    if args.auth_env:
        if not environ.get(args.auth_env):
            raise LaunchError(f"--auth-env {args.auth_env}: that environment variable is not set; "
                              f"export {args.auth_env}=user:password first")
        lines.append((f"--auth-env {args.auth_env}", environ[args.auth_env].strip()))
    logins = []
    for where, line in lines:
        user, _, password = line.partition(":")
        if not user.strip() or len(password) < MIN_PASSWORD:
            raise LaunchError(f"{where}: expected 'user:password' with a password of at least {MIN_PASSWORD} "
                              "characters")
        logins.append((user.strip(), password))
    return logins


def launch_options(args: argparse.Namespace, environ: Mapping[str, str] | None = None,
                   max_upload_mb: int = 10) -> dict[str, Any]:
    """The keyword arguments of `demo.launch`. Beyond loopback (a non-loopback --host, or --share) a login is
    required, else a LaunchError says what to add; with one, a warning goes to stderr."""
    logins = read_logins(args, os.environ if environ is None else environ)
    exposed = [what for what, yes in ((f"--host {args.host}", not is_loopback(args.host)),
                                      ("--share", args.share)) if yes]
    if exposed and not logins:
        raise LaunchError(f"{' and '.join(exposed)} opens the app beyond this machine, and anyone who reaches it could "
                          "generate images, read scores and start training runs here: add --auth-file FILE "
                          "(lines 'user:password') or --auth-env VAR (a variable holding 'user:password'), "
                          "or keep the default --host 127.0.0.1 and use an SSH tunnel")
    if exposed:
        print(f"ddpo app: WARNING: {' and '.join(exposed)}: the app is reachable beyond this machine. Anyone who logs "
              "in can generate images, score uploads and start training runs as this user. The connection is plain "
              "HTTP (passwords included): put a TLS-terminating proxy in front, or use an SSH tunnel "
              f"(ssh -L {args.port}:127.0.0.1:{args.port} HOST) and --host 127.0.0.1.", file=sys.stderr)
    return {"server_name": args.host, "server_port": args.port, "share": args.share, "auth": logins or None,
            "max_file_size": f"{max_upload_mb}mb", "footer_links": ["api"],
            "run_history": False}  # its history page can upload runs to a Hugging Face bucket


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    for flag, value, low, high in (("--max-images", args.max_images, 1, 10_000),
                                   ("--max-steps", args.max_steps, 1, 10_000),
                                   ("--concurrency", args.concurrency, 1, 1_000), ("--port", args.port, 1, 65_535)):
        if not low <= value <= high:
            print(f"ddpo app: {flag} must be between {low} and {high}, got {value}", file=sys.stderr)
            return 2
    try:
        settings = make_settings(args)
        options = launch_options(args, max_upload_mb=settings.limits.max_upload_mb)
    except LaunchError as err:
        print(f"ddpo app: {err}", file=sys.stderr)
        return 2
    # Before gradio is imported: it reads these at import time.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ddpo.ui import build_app

    demo = build_app(settings)
    try:
        demo.launch(**options)
    except OSError as err:
        print(f"ddpo app: cannot listen on {args.host}:{args.port} ({err}); pass --port N", file=sys.stderr)
        return 1
    finally:
        demo.training.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
