"""The DDPO training entry point: accelerate, the epoch loop, checkpoints, metrics.

Per epoch: prompts -> trajectories (ddpo/rollout.py) -> rewards (overlapped) -> advantages
(ddpo/advantages.py) -> policy update (ddpo/update.py) -> metrics and a checkpoint. This is the only
module of the trainer that knows about accelerate, trackers and the filesystem.

Nothing broken is saved: a checkpoint is written only when every trained weight and optimizer moment is finite,
and a SIGINT/SIGTERM that arrives while one is written waits until it is complete. On SIGINT (or SIGTERM under
`ddpo train`) `train` stops the reward worker and raises `TrainingInterrupted`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpo import checkpoint as ckpt
from ddpo import sharding
from ddpo.advantages import PerPromptStatTracker, batch_advantages, group_advantages, group_relative_advantages
from ddpo.config import Config, ConfigError, config_from_file, save_config
from ddpo.losses import NonFiniteError
from ddpo.memory import chosen_timesteps, pin_timesteps
from ddpo.metrics import append_metrics, epoch_line, run_folder_line, save_grid, truncate_metrics
from ddpo.pipeline import load_trained_weights, prepare_denoiser, save_trained_weights, speed_options
from ddpo.reward_pool import RewardPool
from ddpo.evaluation import Evaluator
from ddpo.rollout import Rollout, collect_rollout
from ddpo.update import epoch_weights, grad_scaler_state, load_grad_scaler_state, policy_update

logger = logging.getLogger("ddpo")


class MissingExtraError(ImportError):
    """An optional package that the config asks for is not installed; the message says what to install."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped `train`. The reward worker is stopped; checkpoints written before are intact."""

    def __init__(self, signum: int = signal.SIGINT, run_dir: Path | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.run_dir = int(signum), run_dir


def make_accelerator(config: Config, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = [name for name, on in (("tensorboard", config.logging.tensorboard and _has_tensorboard()),
                                      ("wandb", config.logging.wandb)) if on]
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir))
    with sharding.plain_accelerate_env():  # under FSDP ddpo shards the denoiser itself (ddpo/sharding.py)
        accelerator = Accelerator(mixed_precision=config.model.mixed_precision, log_with=trackers or None,
                                  cpu=not torch.cuda.is_available(), project_config=project)
    if config.model.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def resolve_run_dir(config: Config, resume: str | None) -> Path:
    """The run folder: the resumed one, or output_dir/run_name (timestamped if empty), refusing to overwrite."""
    if resume:
        path = Path(resume)
        return path.parent.parent if path.parent.name == "checkpoints" else path
    name = config.logging.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.logging.output_dir) / name
    if ckpt.list_checkpoints(run_dir):
        raise FileExistsError(f"{run_dir} already has checkpoints; continue it with `ddpo train --resume {run_dir}` "
                              "or choose another logging.run_name")
    return run_dir


def build_policy(config: Config, device: torch.device):
    """The model family on `device`: frozen parts in the inference dtype, trainable denoiser params (LoRA or all)
    in fp32. Returns (family, params)."""
    from ddpo.families import family_class, load_family

    m = config.model
    family_class(m.pretrained, m.revision).check_config(config)  # model_index.json only: before the weights load
    family = load_family(m.pretrained, m.revision)
    family.set_resolution(m.resolution)
    family.step_kind = config.sample.flow_step
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[m.mixed_precision]
    # Only cast when needed: diffusers warns on any .to(dtype=...), even a no-op float32 one.
    frozen = {} if dtype == torch.float32 else {"dtype": dtype}
    for module in family.frozen_modules():
        module.to(device, **frozen).requires_grad_(False)
    # Sharded: the full denoiser stays on the CPU; fully_shard moves only each process's shard to `device`.
    family.denoiser.to("cpu" if sharding.requested() else device, **(frozen if m.use_lora else {}))
    torch.manual_seed(config.seed)  # identical LoRA initialisation on every process
    params = prepare_denoiser(family.denoiser, use_lora=m.use_lora, rank=m.lora_rank, alpha=m.lora_alpha,
                              target_modules=m.lora_target_modules or list(family.default_lora_targets),
                              gradient_checkpointing=m.gradient_checkpointing,
                              attention=m.attention)
    for p in params:
        p.data = p.data.float()
    speed_options(family.denoiser, device, compile=m.compile, channels_last=m.channels_last)
    return family, params


def make_optimizer(config: Config, params: list) -> torch.optim.Optimizer:
    t = config.train
    optimizer_cls = torch.optim.AdamW
    if t.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise MissingExtraError("train.use_8bit_adam=true needs bitsandbytes: pip install bitsandbytes "
                                    "(or pip install 'ddpo[bnb]')") from None
        optimizer_cls = bnb.optim.AdamW8bit
    return optimizer_cls(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                         weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)


def compute_weights(accelerator, rollout: Rollout, tracker: PerPromptStatTracker | None, config: Config):
    """Gather every process's rewards, normalise them into advantages, return (this process's weights (N,), stats)."""
    from accelerate.utils import gather_object

    index = gather_object(rollout.global_index.tolist())
    prompts = gather_object(rollout.prompts)
    rewards = np.asarray(gather_object(rollout.rewards.tolist()), dtype=np.float32)
    valid = np.asarray(gather_object(rollout.valid.tolist()), dtype=bool)
    order = np.argsort(index)  # canonical order: the same for any number of processes
    prompts, rewards, valid = [prompts[i] for i in order], rewards[order], valid[order]
    kept = [p for p, v in zip(prompts, valid) if v]
    advantages = np.zeros_like(rewards)
    groups = np.sort(np.asarray(index))[valid] // config.sample.images_per_prompt  # a group's images are adjacent
    if valid.any() and config.train.algorithm == "grpo":
        advantages[valid] = group_relative_advantages(rewards[valid], groups, config.train.group_std)
    elif valid.any() and tracker is not None:
        scale = float(rewards[valid].std()) if config.train.group_std == "batch" else None  # else each prompt's
        advantages[valid] = (group_advantages(tracker, kept, rewards[valid], groups, scale)  # each group by itself
                             if config.sample.images_per_prompt > 1 else tracker.update(kept, rewards[valid], scale))
    elif valid.any():
        advantages[valid] = batch_advantages(rewards[valid])
    t = config.train
    weights = epoch_weights(t.algorithm, advantages, valid, t.rwr_temperature, t.rwr_sparse_quantile)
    position = {g: i for i, g in enumerate(np.asarray(index)[order])}
    local = torch.tensor([weights[position[int(g)]] for g in rollout.global_index], device=accelerator.device)
    stats = {"reward_mean": float(rewards[valid].mean()) if valid.any() else None,
             "reward_std": float(rewards[valid].std()) if valid.any() else None,
             "num_samples": int(len(rewards)), "num_skipped": int((~valid).sum())}
    return local, stats


def train(config: Config, resume: str | None = None) -> Path:
    """Run DDPO as configured; returns the run folder. `resume`: a run folder or a checkpoint folder."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    processes = PartialState(cpu=not torch.cuda.is_available()).num_processes  # join the process group first
    run_dir = Path(broadcast_object_list([str(resolve_run_dir(config, resume))])[0])
    resume_from = ckpt.find_checkpoint(Path(resume)) if resume else None
    if resume_from is not None:
        ckpt.check_compatible(resume_from, config)
        _check_resumable(resume_from, config)
    from prompts import load_grammar

    grammar = load_grammar(config.prompts.grammar)  # grammar, tracker and reward errors surface before loading
    _check_splits(grammar, config)
    _check_trackers(config)
    if sharding.requested():  # FSDP (ddpo/sharding.py): refuse what it cannot run before the weights load
        sharding.check_config(grammar, config, processes)
    accelerator = make_accelerator(config, run_dir)
    is_main = accelerator.is_main_process
    # Bars redraw in place on a terminal; redirected to a file, every redraw would be a line of the log.
    progress = config.logging.progress and is_main and sys.stderr.isatty()
    reward_pool = RewardPool(config.reward.name, config.reward.kwargs, config.reward.executor, config.reward.timeout_s)
    evaluator = Evaluator(config, grammar, reward_pool)  # builds reward.eval_name's judge: its errors come first too
    try:
        family, params = build_policy(config, accelerator.device)
        _warn_long_prompts(grammar, config, family.tokenizers()[0])
        if sharding.requested():  # the optimizer holds the sharded parameters
            params = sharding.shard_denoiser(family.denoiser, accelerator.device, config.model.mixed_precision,
                                             config.model.use_lora)
        optimizer = make_optimizer(config, params)
        unet, optimizer = ((family.denoiser, accelerator.prepare(optimizer)) if sharding.is_sharded(family.denoiser)
                           else accelerator.prepare(family.denoiser, optimizer))  # FSDP reduces, not DDP
        tracker = (PerPromptStatTracker(config.train.stat_buffer_size, config.train.stat_min_count)
                   if config.train.per_prompt_stat_tracking else None)
        start_epoch = (_restore(resume_from, accelerator, family, unet, optimizer, tracker, config)
                       if resume_from else 0)
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, run_dir / "config.yaml")
            truncate_metrics(run_dir / "metrics.jsonl", start_epoch)
            accelerator.init_trackers("ddpo", config=_flat(config.to_dict()))
            print(run_folder_line(run_dir, config, resumed=resume_from is not None,
                                  tensorboard=config.logging.tensorboard and _has_tensorboard()), flush=True)
        baseline = {}
        if config.prompts.eval_every and start_epoch == 0:  # "before" for the before/after comparison
            before = evaluator.run(family, unet, accelerator, run_dir / "samples" / "eval_before.png")
            baseline = {name.replace("_mean", "") + "_before": value for name, value in before.items()}
        # `epoch` is the 0-based index that seeds the epoch's draws; everything a person reads (console, metrics,
        # grids, checkpoint folders) numbers epochs 1..N: `epoch + 1`, the number of epochs completed.
        for epoch in range(start_epoch, config.train.num_epochs):
            row = _run_epoch(config, epoch, family, unet, optimizer, accelerator, params, grammar, reward_pool,
                             tracker, run_dir, progress)
            if evaluator.due(epoch):  # after the epoch's own timing: epoch_s and samples_per_s measure training
                eval_start = time.perf_counter()
                row.update(evaluator.run(family, unet, accelerator,
                                         run_dir / "samples" / f"eval_epoch_{epoch + 1:04d}.png"))
                row["eval_s"] = time.perf_counter() - eval_start
            row.update(baseline if epoch == 0 else {})
            if is_main:
                append_metrics(run_dir / "metrics.jsonl", row)
                accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch + 1)
                print(epoch_line(row, config.train.num_epochs), flush=True)
            if (epoch + 1) % config.logging.save_every == 0 or epoch + 1 == config.train.num_epochs:
                _save(run_dir, epoch, accelerator, family, unet, optimizer, params, tracker, config)
        accelerator.end_training()
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM where `ddpo train` turned it into TrainingInterrupted
        raise TrainingInterrupted(getattr(err, "signum", signal.SIGINT), run_dir) from None
    finally:
        evaluator.close()
        reward_pool.close()
        # accelerate keeps mixed precision in a process-wide singleton; forget it so that a later train() in
        # this process (a notebook, a benchmark) may choose another. end_training() above has already destroyed
        # the process group of a distributed run.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
    return run_dir


def _has_tensorboard() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def _check_trackers(config: Config) -> None:
    import importlib.util

    if config.logging.tensorboard and not _has_tensorboard():
        # accelerate would drop the tracker with a debug-level note only; a user who asked for it should know.
        logger.warning("logging.tensorboard=true but tensorboard is not installed: this run writes no TensorBoard "
                       "files (pip install tensorboard, or set logging.tensorboard=false)")
    if config.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise MissingExtraError("logging.wandb=true needs wandb: pip install wandb (or pip install 'ddpo[wandb]'), "
                          "or set logging.wandb=false")


def _check_splits(grammar, config: Config) -> None:
    p = config.prompts
    used = [("prompts.split", p.split)] + ([("prompts.eval_split", p.eval_split)] if p.eval_every else [])
    for key, split in used:
        if split in ("heldout", "mix") and not grammar.has_heldout:
            raise ConfigError(f"{key}={split} but grammar {grammar.name!r} defines no held-out split; add a heldout: "
                             f"section to it (see docs/prompts.md) or set {key}=all")


def _warn_long_prompts(grammar, config: Config, tokenizer) -> None:
    """Warn (once, naming them) about prompts longer than the text encoder takes: they would be cut silently."""
    from prompts import check_prompt_lengths

    split = None if config.prompts.split in ("all", "mix") else config.prompts.split
    finite = grammar.is_finite and grammar.count(split) <= 20_000
    check_prompt_lengths(grammar.enumerate(split) if finite else grammar.sample(512, seed=config.seed, split=split),
                         tokenizer)


def _run_epoch(config, epoch, family, unet, optimizer, accelerator, params, grammar, reward_pool, tracker,
               run_dir: Path, progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    policy = accelerator.unwrap_model(unet)  # sampling needs no DDP (and must not broadcast buffers)
    policy.eval()
    rollout = collect_rollout(family, policy, grammar, reward_pool, config, epoch, accelerator.process_index,
                              accelerator.num_processes, accelerator.device, accelerator.autocast, progress)
    weights, stats = compute_weights(accelerator, rollout, tracker, config)
    if accelerator.is_main_process and config.logging.sample_grid:
        _save_grid(rollout, run_dir / "samples" / f"epoch_{epoch + 1:04d}.png")
    train_start = time.perf_counter()
    unet.train()
    losses = policy_update(unet, family, optimizer, accelerator, params, rollout, weights, config, epoch,
                           progress)
    train_s = time.perf_counter() - train_start
    row = {"epoch": epoch + 1, **stats, **losses, "sample_s": rollout.sample_s, "reward_s": rollout.reward_s,
           "train_s": train_s}
    row["epoch_s"] = time.perf_counter() - start
    row["samples_per_s"] = stats["num_samples"] / row["epoch_s"]
    return row


def _save_grid(rollout: Rollout, path: Path, max_images: int = 16) -> None:
    n = min(max_images, len(rollout.prompts))
    images = (rollout.trajectories.images[:n].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    captions = [f"{rollout.prompts[i]} | r={rollout.rewards[i]:.3f}" for i in range(n)]
    save_grid(images, captions, path)


def _save(run_dir, epoch, accelerator, family, unet, optimizer, params, tracker, config) -> None:
    """Every process enters (the reference DDPO hung when only one did); the main process writes.

    Every process checks the weights first (identical on all, or under FSDP each its shard, agreed by all), so a
    refusal raises everywhere. Under FSDP every process also takes part in gathering weights and optimizer state."""
    accelerator.wait_for_everyone()
    _check_finite_state(params, optimizer, epoch)
    policy = accelerator.unwrap_model(unet) if unet is not None else None
    gathered, optimizer_state = sharding.gather_checkpoint(policy, optimizer, config.model.use_lora,
                                                           accelerator.is_main_process)  # (None, None) unsharded
    if accelerator.is_main_process:
        done = epoch + 1
        state = {"epoch": done, "epochs_done": done, "num_processes": accelerator.num_processes, "rng": ckpt.rng_state(),
                 "stat_tracker": tracker.state_dict() if tracker is not None else None,
                 "grad_scaler": grad_scaler_state(accelerator),
                 "timesteps_per_call": chosen_timesteps(policy)}  # auto's choice: a resume makes the same calls
        with _signals_deferred():
            ckpt.write_checkpoint(run_dir, done,
                                  weights_writer=lambda folder: save_trained_weights(family, policy, folder,
                                                                                     config.model.use_lora, gathered),
                                  optimizer_state=optimizer_state if optimizer_state is not None
                                  else optimizer.state_dict(), trainer_state=state, config=config,
                                  keep_last=config.logging.keep_last)
    accelerator.wait_for_everyone()


def _check_finite_state(params: list, optimizer, epoch: int) -> None:
    """Refuse to save NaN/inf trained weights or optimizer moments (resuming from them could never recover)."""
    moments = [v for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v) and v.is_floating_point()]
    flags = sharding.nonfinite_flags([*params, *moments])  # sharded: each process its rows, agreed by all
    bad, bad_moments = sum(flags[:len(params)]), sum(flags[len(params):])
    if bad or bad_moments:
        raise NonFiniteError(f"not saving epoch {epoch + 1}'s checkpoint: {bad} of {len(params)} trained weight tensors "
                             f"and {bad_moments} of {len(moments)} optimizer tensors hold NaN/inf (earlier checkpoints "
                             "are intact). Training diverged: lower train.learning_rate and resume from the last "
                             "checkpoint.")


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM received in the block take effect when it ends, so a checkpoint is never cut short.

    (Writes are atomic anyway; this keeps the newest finished epoch.) Only the main thread can set handlers."""
    signals = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not None]
    if threading.current_thread() is not threading.main_thread():
        signals = []
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])  # handled now as it would have been


def _restore(folder: Path, accelerator, family, unet, optimizer, tracker, config) -> int:
    """Load a verified checkpoint into the prepared model and optimizer; returns the epoch to start at.

    The optimizer's hyperparameters and the stat tracker's sizes come from `config`, not the checkpoint:
    `--resume RUN train.learning_rate=X` trains at X, as the run's config.yaml then says."""
    state = ckpt.read_trainer_state(folder)
    policy = accelerator.unwrap_model(unet)
    load_trained_weights(family, policy, folder, config.model.use_lora)
    optimizer_state = ckpt.read_optimizer_state(folder)  # full tensors, whether or not the run that wrote it sharded
    optimizer.load_state_dict(sharding.shard_optimizer_state(optimizer, optimizer_state) if sharding.is_sharded(policy)
                              else optimizer_state)
    _apply_optimizer_settings(optimizer, config)
    if tracker is not None and state.get("stat_tracker"):
        # The saved buffers with this config's sizes (a smaller buffer keeps each prompt's newest rewards).
        tracker.load_state_dict({**state["stat_tracker"], "buffer_size": tracker.buffer_size,
                                 "min_count": tracker.min_count})
    load_grad_scaler_state(accelerator, state.get("grad_scaler"))  # fp16: the loss scale the run had reached
    pin_timesteps(policy, state.get("timesteps_per_call"))  # train.timesteps_per_call=auto: the run's choice
    ckpt.set_rng_state(state["rng"])
    done = ckpt.epochs_done(state)
    logger.info("resumed from %s (%d epochs done)", folder, done)
    return done


def _check_resumable(folder: Path, config: Config) -> None:
    """Refuse what a resume cannot apply: the optimizer state of AdamW and 8-bit AdamW do not convert."""
    saved = config_from_file(folder / "config.yaml").train.use_8bit_adam
    if saved != config.train.use_8bit_adam:
        raise ConfigError(f"train.use_8bit_adam={config.train.use_8bit_adam} but checkpoint {folder} was trained with "
                          f"train.use_8bit_adam={saved}: its optimizer state does not convert; resume with the same "
                          "value")


def _apply_optimizer_settings(optimizer, config: Config) -> None:
    """Set learning rate, betas, weight decay and epsilon of every parameter group from `config`."""
    t = config.train
    settings = {"lr": t.learning_rate, "betas": (t.adam_beta1, t.adam_beta2), "weight_decay": t.adam_weight_decay,
                "eps": t.adam_epsilon}
    for group in optimizer.param_groups:
        group.update({key: value for key, value in settings.items() if key in group})


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> flat {"train.learning_rate": 3e-4} with values TensorBoard's hparams accept."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
