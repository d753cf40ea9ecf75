"""`ddpo train [CONFIG] [section.key=value ...] [--resume RUN]`."""

from __future__ import annotations

import argparse
import contextlib
import sys


def build_parser() -> argparse.ArgumentParser:
    from ddpo.config import DEFAULT_PRESET

    parser = argparse.ArgumentParser(
        prog="ddpo train",
        description="Finetune a diffusion model with DDPO. With no arguments, runs the offline Shapes-world default "
                    f"(configs/{DEFAULT_PRESET}.yaml) on this machine.",
        epilog="Examples:\n  ddpo train\n  ddpo train sd15_aesthetic train.learning_rate=1e-4\n"
               "  ddpo train my.yaml sample.batch_size=4 logging.run_name=try1\n  ddpo train --resume runs/try1\n"
               "Multi-GPU: accelerate launch -m ddpo.cli train CONFIG (or torchrun --nproc_per_node N -m ddpo.cli train)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None,
                        help=f"a preset name (see --list-presets) or a YAML file (default: {DEFAULT_PRESET})")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.num_epochs=10")
    parser.add_argument("--resume", metavar="RUN", help="continue a run: its folder (runs/NAME) or a checkpoint folder")
    parser.add_argument("--list-presets", action="store_true", help="list the presets in configs/ and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: list[str]) -> int:
    status = _main(argv)
    if _launched_distributed():
        _exit_now(status)
    return status


def _launched_distributed() -> bool:
    """True in a process started by torchrun or `accelerate launch` with more than one process."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _exit_now(status: int) -> None:
    """End a distributed process without the interpreter's teardown.

    Everything the run writes is on disk and the process group is gone (accelerate's end_training destroys it),
    yet gloo's and FSDP2's threads can still abort the process at C++ static destruction ("terminate called
    without an active exception", SIGABRT): measured on 2 CPU processes, 6 in 20 plain gloo runs without
    destroy_process_group(), and 2-5 in 20 FSDP2 runs even with it. A finished run would then exit non-zero,
    so it leaves through os._exit once its output is flushed.
    """
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def _main(argv: list[str]) -> int:
    from ddpo.config import DEFAULT_PRESET, ConfigError, list_presets, load_config, preset_description

    args = build_parser().parse_args(argv)
    if args.list_presets:
        names = list_presets()
        width = max(len(name) for name in names)
        for name in names:
            default = " (the default)" if name == DEFAULT_PRESET else ""
            print(f"{name:<{width}}  {preset_description(name)}{default}")
        return 0
    config_arg, overrides = args.config, list(args.overrides)
    if config_arg and "=" in config_arg:  # `ddpo train seed=3`: an override, not a config file
        config_arg, overrides = None, [config_arg, *overrides]
    try:
        if args.resume:
            config = _resume_config(args.resume, config_arg, overrides)
        else:
            config = load_config(config_arg, overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"ddpo train: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return 0
    from ddpo.checkpoint import CheckpointError
    from ddpo.losses import NonFiniteError
    from ddpo.pipeline import ModelLoadError
    from ddpo.reward_pool import RewardError
    from ddpo.trainer import MissingExtraError, train
    from prompts import GrammarError

    # The project's own errors print one line; anything else is a bug and keeps its traceback.
    expected = (ConfigError, GrammarError, CheckpointError, ModelLoadError, RewardError, NonFiniteError,
                MissingExtraError, FileExistsError)
    try:
        with _stop_on_signals():
            run_dir = train(config, resume=args.resume)
    except expected as err:
        print(f"ddpo train: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        return _interrupted(err)
    from ddpo.checkpoint import list_checkpoints

    saved = list_checkpoints(run_dir)
    newest = f"; newest checkpoint {saved[-1]}" if saved else ""
    print(f"done: run folder {run_dir} (metrics.jsonl, samples/, checkpoints/){newest}")
    return 0


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT and SIGTERM raise TrainingInterrupted, so the run cleans up (stops the reward worker) and exits
    130 or 143. A second signal during that cleanup exits at once."""
    import os
    import signal
    import threading

    from ddpo.trainer import TrainingInterrupted

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda second, _: os._exit(128 + second))
        raise TrainingInterrupted(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupted(err: KeyboardInterrupt) -> int:
    """One line on what is left, and the exit status of a process stopped by that signal (128 + signum)."""
    import signal

    from ddpo.checkpoint import list_checkpoints

    signum = getattr(err, "signum", signal.SIGINT)
    run_dir = getattr(err, "run_dir", None)
    saved = list_checkpoints(run_dir) if run_dir is not None else []
    if run_dir is None:
        where = "training had not started"
    elif saved:
        where = f"{saved[-1]} is the newest checkpoint; continue with `ddpo train --resume {run_dir}`"
    else:
        where = f"no checkpoint of {run_dir} had been written"
    print(f"ddpo train: stopped by {signal.Signals(signum).name}; {where}", file=sys.stderr)
    return 128 + signum


def _resume_config(resume: str, config_arg: str | None, overrides: list[str]):
    """A resumed run keeps its saved config; overrides (e.g. train.num_epochs=20) still apply."""
    from pathlib import Path

    import yaml

    from ddpo.config import Config, ConfigError, apply_overrides, from_dict
    from ddpo.validation import validate

    if config_arg:
        raise ConfigError("--resume takes the config saved in the run; pass only section.key=value overrides")
    path = Path(resume)
    saved = path / "config.yaml" if (path / "config.yaml").is_file() else path.parent.parent / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"{resume} has no config.yaml: pass a run folder (runs/NAME) written by `ddpo train`")
    config = from_dict(Config, apply_overrides(yaml.safe_load(saved.read_text()), overrides), where="")
    validate(config)
    return config
