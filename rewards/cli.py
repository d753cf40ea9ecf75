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
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files: PNG, JPEG or WebP")
    parser.add_argument("--reward", required=True,
                        help="comma-separated reward names, e.g. aesthetic,jpeg_compressibility "
                             "(see --list), or package.module:function")
    parser.add_argument("--prompt", default="", help="the prompt the images were generated from (one for all)")
    parser.add_argument("--kwargs", type=_json_arg, default={},
                        help='JSON object of kwargs per reward, e.g. \'{"aesthetic": {"mlp_path": "mlp.pth"}}\'')
    parser.add_argument("--device", default=None, help="device for rewards that load models (cpu, cuda, cuda:1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image instead of a table")
    parser.add_argument("--list", action="store_true", help="list the reward names and exit")
    parser.add_argument("--max-image-mpix", type=_positive(float), default=16.0,
                        help="largest image in megapixels of 1024x1024 (default 16: 4096x4096), checked before "
                             "decoding")
    if "--list" in argv:
        from rewards import list_rewards

        print("\n".join(list_rewards()))
        return 0
    args = parser.parse_args(argv)
    from rewards import build_reward
    from rewards.extra import RewardUnavailable
    from rewards.images import open_image

    names = [n.strip() for n in args.reward.split(",") if n.strip()]
    unknown = sorted(set(args.kwargs) - set(names))
    if unknown:
        parser.error(f"--kwargs names {unknown}, which are not in --reward {names}")
    images = []
    for path in args.images:
        try:  # the decoder and RGB conversion of the Python API, the reward server and the app
            images.append(open_image(path, "it", max_pixels=int(args.max_image_mpix * 2**20)))
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


SERVE_EPILOG = """\
limits (each a flag above; every one is checked before the work it bounds):
  - a request body above --max-request-mb, more than --max-batch images, an image above --max-image-mpix or a
    request above --max-request-mpix (counted from the image headers, before decoding) is answered 413;
    anything but PNG, JPEG and WebP is answered 400 (PIL's other decoders, Ghostscript included, never run)
  - all requests together hold at most --max-total-mpix decoded; a request that does not fit now gets 503 with
    Retry-After. Memory for request data stays below workers x 3 x max-request-mb + 3 bytes x max-total-mpix
    + workers x 8 bytes x max-image-mpix ({budget:.2f} GiB with the defaults; the model's own memory comes on top)
  - --workers requests are read and answered at once and --queue connections wait; beyond that a connection
    gets 503 with Retry-After at once. The listen backlog is {backlog}
  - a request must arrive within --read-timeout seconds of its connection being accepted, or it is dropped
  - one reward call at a time; a call that exceeds --reward-timeout answers 504, and until it returns GET /health
    and POST /score answer 503 (restart the server if it stays stuck)
1 Mpx = 1024 x 1024 pixels. Beyond 127.0.0.1, put it behind a TLS-terminating reverse proxy (nginx, Caddy):
the bearer token is otherwise sent in plain text. See docs/rewards.md."""


def _positive(kind: type) -> Any:
    """An argparse type: a finite number above 0 (`kind` int or float), with a one-line error otherwise."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be above 0 and finite, got {text!r}")
        return value
    return parse


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer port, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535 (0 picks a free port), got {port}")
    return port


def _serve_parser() -> argparse.ArgumentParser:
    from rewards.serving import Limits

    defaults = Limits()
    epilog = SERVE_EPILOG.format(budget=defaults.memory_budget() / 2**30, backlog=defaults.backlog)
    parser = argparse.ArgumentParser(
        prog="ddpo serve-reward", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
        description="Serve a reward over HTTP (JSON + base64 PNG/JPEG/WebP; never pickle). "
        "Clients: build_reward('remote', url='http://HOST:PORT').")
    add = parser.add_argument
    add("--reward", required=True, help="reward name (see `ddpo score --list`) or package.module:function")
    add("--kwargs", type=_json_arg, default={}, help="JSON object of the reward's kwargs")
    add("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    add("--port", type=_port, default=8085, help="port to bind, 0-65535 (0: a free one; default %(default)s)")
    add("--token-env", default="DDPO_REWARD_TOKEN",
        help="environment variable holding the bearer token clients must send (unset: no auth; "
             "default %(default)s)")
    positive_int, positive = _positive(int), _positive(float)
    add("--max-batch", type=positive_int, default=64, help="most images per request (default %(default)s)")
    add("--max-request-mb", type=positive, default=64.0, help="largest request body in MiB (default %(default)s)")
    add("--max-image-mpix", type=positive, default=16.0,
        help="largest image, in Mpx (default %(default)s: 4096x4096)")
    add("--max-request-mpix", type=positive, default=64.0,
        help="most pixels in one request, in Mpx (default %(default)s)")
    add("--max-total-mpix", type=positive, default=128.0,
        help="most pixels held decoded by all requests at once, in Mpx (default %(default)s)")
    add("--workers", type=positive_int, default=4, help="requests read and answered at once (default %(default)s)")
    add("--queue", type=positive_int, default=32,
        help="connections waiting for a worker before 503 (default %(default)s)")
    add("--read-timeout", type=positive, default=30.0, help="seconds for a request to arrive (default %(default)s)")
    add("--reward-timeout", type=positive, default=240.0,
        help="seconds for one reward call before 504 (default %(default)s; keep it below the client's "
             "timeout: remote's is 300)")
    return parser


def serve_main(argv: list[str]) -> int:
    parser = _serve_parser()
    args = parser.parse_args(argv)
    import socket

    from rewards import build_reward
    from rewards.server import make_server
    from rewards.serving import MPX, Limits

    try:
        socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        parser.error(f"--host {args.host!r} cannot be resolved ({err})")
    try:
        limits = Limits(max_batch=args.max_batch, max_request_bytes=int(args.max_request_mb * 2**20),
                        max_image_pixels=int(args.max_image_mpix * MPX),
                        max_request_pixels=int(args.max_request_mpix * MPX),
                        max_total_pixels=int(args.max_total_mpix * MPX), workers=args.workers, queue=args.queue,
                        read_timeout=args.read_timeout, reward_timeout=args.reward_timeout)
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    token = os.environ.get(args.token_env) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        print(f"ddpo serve-reward: WARNING: serving on {args.host} without a token; anyone who can reach this "
              f"port can use your GPU. Set {args.token_env} to require a bearer token.", file=sys.stderr)
    try:
        reward = build_reward(args.reward, **args.kwargs)
    except (ValueError, TypeError, ImportError, AttributeError, OSError) as err:
        parser.error(f"--reward {args.reward!r}: {err}")
    try:
        server = make_server(reward, args.reward, args.host, args.port, token, limits)
    except OSError as err:
        parser.error(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}")
    print(f"serving reward {args.reward!r} on http://{args.host}:{server.server_address[1]} "
          f"(POST /score, GET /health; auth: {'bearer token' if token else 'none'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
