"""`ddpo score` (score image files from the command line) and `ddpo serve-reward` (serve a reward over HTTP)."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
from typing import Any


def _json_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _accepts_device(name: str) -> bool:
    from rewards import REGISTRY, import_object

    factory = import_object(REGISTRY.get(name, name))
    return "device" in inspect.signature(factory).parameters


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def score_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ddpo score", description="Score image files with one or more rewards: one row per image, "
        "one column per reward (and the captions of caption-based rewards).")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--reward", required=True,
                        help="comma-separated reward names, e.g. aesthetic,jpeg_compressibility "
                             "(see --list), or package.module:function")
    parser.add_argument("--prompt", default="", help="the prompt the images were generated from (one for all)")
    parser.add_argument("--kwargs", type=_json_arg, default={},
                        help='JSON object of kwargs per reward, e.g. \'{"aesthetic": {"mlp_path": "mlp.pth"}}\'')
    parser.add_argument("--device", default=None, help="device for rewards that load models (cpu, cuda, cuda:1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image instead of a table")
    parser.add_argument("--list", action="store_true", help="list the reward names and exit")
    if "--list" in argv:
        from rewards import list_rewards

        print("\n".join(list_rewards()))
        return 0
    args = parser.parse_args(argv)
    from PIL import Image

    from rewards import build_reward
    from rewards.extra import RewardUnavailable

    names = [n.strip() for n in args.reward.split(",") if n.strip()]
    unknown = sorted(set(args.kwargs) - set(names))
    if unknown:
        parser.error(f"--kwargs names {unknown}, which are not in --reward {names}")
    images = []
    for path in args.images:
        try:
            images.append(Image.open(path).convert("RGB"))  # convert() reads the file now, so errors show here
        except (OSError, ValueError) as err:
            parser.error(f"cannot read image {path!r}: {err}")
    prompts, metadata = [args.prompt] * len(images), [{} for _ in images]
    rows: list[dict[str, Any]] = [{"image": path} for path in args.images]
    failed = False
    for name in names:
        kwargs = dict(args.kwargs.get(name, {}))
        try:
            if args.device and "device" not in kwargs and _accepts_device(name):
                kwargs["device"] = args.device
            scores, info = build_reward(name, **kwargs)(images, prompts, metadata)
        except RewardUnavailable as err:
            print(f"ddpo score: skipping {name!r}: {err}", file=sys.stderr)
            continue
        except Exception as err:  # report it, and still print the other rewards' columns
            print(f"ddpo score: reward {name!r} failed: {type(err).__name__}: {err}", file=sys.stderr)
            failed = True
            continue
        for i, row in enumerate(rows):
            row[name] = float(scores[i])
            if "captions" in info:
                row[f"{name}:caption"] = info["captions"][i]
            if info.get("unscorable") and info["unscorable"][i]:
                row[f"{name}:unscorable"] = info["unscorable"][i]
    _print_rows(rows, args.json)
    return 1 if failed else 0


def _print_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for row in rows:
            print(json.dumps({k: (None if v != v else v) for k, v in row.items()}))  # NaN -> null
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = [columns] + [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(line[j]) for line in table) for j in range(len(columns))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def serve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ddpo serve-reward", description="Serve a reward over HTTP (JSON + base64 PNG; never pickle). "
        "Clients: build_reward('remote', url='http://HOST:PORT').")
    parser.add_argument("--reward", required=True, help="reward name or package.module:function")
    parser.add_argument("--kwargs", type=_json_arg, default={}, help="JSON object of the reward's kwargs")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=8085)
    parser.add_argument("--token-env", default="DDPO_REWARD_TOKEN",
                        help="environment variable holding the bearer token clients must send (unset: no auth)")
    parser.add_argument("--max-batch", type=int, default=64, help="most images per request")
    parser.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body in MiB")
    args = parser.parse_args(argv)
    from rewards import build_reward
    from rewards.server import make_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    token = os.environ.get(args.token_env) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        print(f"ddpo serve-reward: WARNING: serving on {args.host} without a token; anyone who can reach this "
              f"port can use your GPU. Set {args.token_env} to require a bearer token.", file=sys.stderr)
    reward = build_reward(args.reward, **args.kwargs)
    server = make_server(reward, args.reward, args.host, args.port, token, args.max_batch,
                         int(args.max_request_mb * 2**20))
    print(f"serving reward {args.reward!r} on http://{args.host}:{server.server_address[1]} "
          f"(POST /score, GET /health; auth: {'bearer token' if token else 'none'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
