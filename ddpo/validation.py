"""Cross-field checks of a config, all before any model loads: each error names the key and what to change."""

from __future__ import annotations

from ddpo.config import DDPO_ALGORITHMS, RUN_NAME, RUN_NAME_RULE, SEED_MAX, Config, ConfigError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def optimizer_steps_per_epoch(c: Config) -> int:
    """Optimizer steps per epoch (on every process alike): inner epochs x samples per process / samples per step."""
    s, t = c.sample, c.train
    per_step = t.batch_size * t.gradient_accumulation_steps
    return t.num_inner_epochs * max(1, s.batch_size * s.num_batches_per_epoch // per_step)


def validate(c: Config) -> None:
    """Cross-field checks, all before any model loads."""
    s, t, p, lg = c.sample, c.train, c.prompts, c.logging
    for key, value in [("sample.num_steps", s.num_steps), ("sample.batch_size", s.batch_size),
                       ("sample.num_batches_per_epoch", s.num_batches_per_epoch), ("train.batch_size", t.batch_size),
                       ("sample.images_per_prompt", s.images_per_prompt),
                       ("train.num_epochs", t.num_epochs), ("train.num_inner_epochs", t.num_inner_epochs),
                       ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
                       ("logging.save_every", lg.save_every), ("logging.keep_last", lg.keep_last),
                       ("train.stat_buffer_size", t.stat_buffer_size), ("prompts.eval_num_prompts", p.eval_num_prompts),
                       ("prompts.eval_images_per_prompt", p.eval_images_per_prompt)]:
        _require(value >= 1, f"{key}={value} must be >= 1")
    _require(s.eta >= 0, f"sample.eta={s.eta} must be >= 0")
    _require(s.guidance_scale >= 1.0, f"sample.guidance_scale={s.guidance_scale} must be >= 1 (1 turns guidance off)")
    if t.algorithm in DDPO_ALGORITHMS:
        _require(s.eta > 0, f"train.algorithm={t.algorithm} needs a stochastic policy: sample.eta={s.eta} makes every "
                 "step deterministic (no log-probability). Set sample.eta > 0 (the DDPO paper uses 1.0 with DDIM, "
                 "Flow-GRPO 0.7 with flow models), or use rwr or nft.")
    if t.algorithm == "grpo":
        _require(s.images_per_prompt >= 2, f"train.algorithm=grpo normalises each reward within its prompt's group, "
                 f"but sample.images_per_prompt={s.images_per_prompt}; set it to the group size (Flow-GRPO uses 24)")
    _require(t.nft_beta > 0, f"train.nft_beta={t.nft_beta} must be > 0")
    _check_sampler(c)
    if t.algorithm == "ddpo_sf":
        _require(t.num_inner_epochs == 1, "train.algorithm=ddpo_sf (REINFORCE) is on-policy: set train.num_inner_epochs=1 "
                 "(use ddpo_is for several inner epochs)")
    _require(s.batch_size % s.images_per_prompt == 0,
             f"sample.batch_size={s.batch_size} is not divisible by sample.images_per_prompt={s.images_per_prompt}: "
             "a batch holds whole groups of images of one prompt; choose a batch size that is a multiple of it")
    samples = s.batch_size * s.num_batches_per_epoch
    _require(samples % t.batch_size == 0,
             f"sample.batch_size * sample.num_batches_per_epoch = {samples} samples per process is not divisible by "
             f"train.batch_size={t.batch_size}; choose a train.batch_size that divides {samples}")
    micro_batches = samples // t.batch_size
    _require(micro_batches % t.gradient_accumulation_steps == 0,
             f"{micro_batches} micro-batches per process per inner epoch is not divisible by "
             f"train.gradient_accumulation_steps={t.gradient_accumulation_steps}; choose a divisor of {micro_batches}")
    steps = optimizer_steps_per_epoch(c)
    if t.algorithm == "ddpo_sf":  # REINFORCE's gradient is unbiased only on the policy that drew the samples
        _require(steps == 1, f"train.algorithm=ddpo_sf (REINFORCE) is on-policy, but {samples} samples per process in "
                 f"steps of train.batch_size={t.batch_size} x train.gradient_accumulation_steps="
                 f"{t.gradient_accumulation_steps} take {steps} optimizer steps per epoch (each after the first on "
                 f"stale samples). Set train.gradient_accumulation_steps={micro_batches} (one step per epoch), or use "
                 "train.algorithm=ddpo_is (importance sampling, made for several steps)")
    _require(0 < t.timestep_fraction <= 1, f"train.timestep_fraction={t.timestep_fraction} must be in (0, 1]")
    _require(t.timesteps_per_call == "auto" or t.timesteps_per_call >= 1,
             f"train.timesteps_per_call={t.timesteps_per_call} must be >= 1 (1 = one UNet call per step) or auto (as "
             "many as fit train.activation_memory_gib)")
    _require(t.activation_memory_gib == "auto" or t.activation_memory_gib > 0,
             f"train.activation_memory_gib={t.activation_memory_gib} must be > 0 (GiB that "
             "train.timesteps_per_call=auto may fill) or auto (a share of the free device memory)")
    _require(t.clip_range > 0, f"train.clip_range={t.clip_range} must be > 0")
    _require(t.adv_clip_max > 0, f"train.adv_clip_max={t.adv_clip_max} must be > 0")
    _require(t.kl_coef >= 0, f"train.kl_coef={t.kl_coef} must be >= 0 (0 turns the KL penalty off)")
    if t.kl_coef > 0:
        _require(t.algorithm in DDPO_ALGORITHMS, f"train.kl_coef={t.kl_coef} is a penalty on the DDPO policy's "
                 f"steps; train.algorithm={t.algorithm} has none. Set train.kl_coef=0")
        _require(c.model.use_lora, f"train.kl_coef={t.kl_coef} takes the pretrained model as the reference by turning "
                 "the LoRA adapters off; full finetuning keeps no copy of it. Set model.use_lora=true or train.kl_coef=0")
    _require(t.learning_rate > 0, f"train.learning_rate={t.learning_rate} must be > 0")
    _require(c.reward.timeout_s > 0, f"reward.timeout_s={c.reward.timeout_s} must be > 0 (seconds per reward call)")
    _require(t.max_grad_norm > 0, f"train.max_grad_norm={t.max_grad_norm} must be > 0")
    _require(t.rwr_temperature > 0, f"train.rwr_temperature={t.rwr_temperature} must be > 0")
    _require(0 <= t.rwr_sparse_quantile < 1, f"train.rwr_sparse_quantile={t.rwr_sparse_quantile} must be in [0, 1)")
    _require(t.stat_min_count >= 1, f"train.stat_min_count={t.stat_min_count} must be >= 1")
    if t.per_prompt_stat_tracking:  # a buffer that never holds stat_min_count rewards would batch-normalise silently
        _require(t.stat_buffer_size >= t.stat_min_count,
                 f"train.stat_buffer_size={t.stat_buffer_size} is smaller than train.stat_min_count={t.stat_min_count}: "
                 "no prompt could ever have its own statistics. Set stat_buffer_size >= stat_min_count, or "
                 "train.per_prompt_stat_tracking=false to normalise by the batch")
    for key, seed in [("seed", c.seed), ("prompts.eval_seed", p.eval_seed)]:
        _require(0 <= seed <= SEED_MAX, f"{key}={seed} must be in [0, {SEED_MAX}]")
    _require(lg.run_name == "" or RUN_NAME.fullmatch(lg.run_name) is not None,
             f"logging.run_name={lg.run_name!r}: {RUN_NAME_RULE}; the run folder is logging.output_dir/run_name "
             "(set logging.output_dir to choose where)")
    _require(c.model.lora_rank >= 1, f"model.lora_rank={c.model.lora_rank} must be >= 1")
    _require(0 < p.mix_heldout < 1, f"prompts.mix_heldout={p.mix_heldout} must be in (0, 1): the held-out share of "
             "the prompts with prompts.split=mix (0 or 1 would be split=train or split=heldout)")
    _require(p.eval_every >= 0, f"prompts.eval_every={p.eval_every} must be >= 0 (0 turns evaluation off)")
    _require(bool(c.model.pretrained), "model.pretrained is empty; give a diffusers folder, a hub id, or 'shapes'")
    _require(bool(c.reward.name), "reward.name is empty; see `ddpo score --help` for the reward names")


def _check_sampler(c: Config) -> None:
    """Resolution, evaluation steps, batches per call and the SDE window."""
    s = c.sample
    _require(s.batches_per_call >= 1, f"sample.batches_per_call={s.batches_per_call} must be >= 1 (1 = one "
             "sampling batch per denoiser call)")
    _require(s.num_batches_per_epoch % s.batches_per_call == 0,
             f"sample.batches_per_call={s.batches_per_call} does not divide sample.num_batches_per_epoch="
             f"{s.num_batches_per_epoch}: batches are sampled in groups of that many. Set sample.batches_per_call to "
             f"a divisor of {s.num_batches_per_epoch} (1 = one batch per call, "
             f"{s.num_batches_per_epoch} = the whole epoch in one call per step)")
    _require(c.model.resolution >= 0, f"model.resolution={c.model.resolution} must be >= 0 (0: the model's own)")
    _require(s.eval_num_steps >= 0, f"sample.eval_num_steps={s.eval_num_steps} must be >= 0 (0: sample.num_steps)")
    _require(0 <= s.sde_window <= s.num_steps,
             f"sample.sde_window={s.sde_window} must be in [0, sample.num_steps={s.num_steps}] (0: no window)")
    if s.sde_window == 0:
        _require(not s.sde_window_starts, f"sample.sde_window_starts={s.sde_window_starts} needs sample.sde_window > 0")
        return
    last = s.num_steps - s.sde_window
    bad = [start for start in s.sde_window_starts if not 0 <= start <= last]
    _require(not bad, f"sample.sde_window_starts has {bad}: a window of {s.sde_window} steps starts at 0..{last} "
             f"(sample.num_steps={s.num_steps})")
