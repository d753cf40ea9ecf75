"""The single config schema: typed dataclasses, YAML presets, `key.sub=value` overrides, validation.

Everything is checked here, before any model loads: unknown keys, wrong types and inconsistent values
raise `ConfigError` naming the key and the valid choices.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

ALGORITHMS = ("ddpo_is", "ddpo_sf", "grpo", "rwr", "rwr_sparse", "nft")
DDPO_ALGORITHMS = ("ddpo_is", "ddpo_sf", "grpo")  # trained on per-step log-probabilities
DEFAULT_PRESET = "shapes_alignment"
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# A run folder's name, as the app checks it: no path separator, no "..", no absolute path, so a run always lands
# inside logging.output_dir. Use RUN_NAME.fullmatch (re's `$` would accept a trailing newline).
RUN_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,79}")
RUN_NAME_RULE = "use letters, digits, '.', '_' and '-' (at most 80), starting with a letter or digit"
SEED_MAX = 2**32 - 1  # numpy and torch seeds must fit in 32 unsigned bits
# YAML 1.1 reads these words as booleans; a Literal that lists one of them gets it back.
_YAML_BOOL_WORDS = {False: ("no", "off", "false", "n"), True: ("yes", "on", "true", "y")}
_PLAIN = (str, int, float, bool, type(None))


class ConfigError(ValueError):
    """A config key is unknown, ill-typed or inconsistent with another."""


@dataclass
class ModelConfig:
    # A local diffusers folder, a hub id, "shapes" (shipped) or a tiny random model built in code ("tiny-random",
    # "tiny-random-sdxl", "tiny-random-sd3", "tiny-random-flux"). Its family (sd, sdxl, sd3, flux) is read from
    # its model_index.json (docs/models.md).
    pretrained: str = "shapes"
    revision: str | None = None
    resolution: int = 0  # image side in pixels; 0 = the model's own (512 for SD 1.5, 1024 for SDXL/SD3.5/FLUX)
    use_lora: bool = True
    lora_rank: int = 4
    lora_alpha: int = 4
    # Empty: the family's attention projections (to_q, to_k, to_v, to_out.0; SD3 and FLUX add the joint attention's
    # add_q_proj, add_k_proj, add_v_proj, to_add_out).
    lora_target_modules: list[str] = field(default_factory=list)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    allow_tf32: bool = True
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "xformers"] = "sdpa"  # xformers falls back to SDPA when absent or without CUDA
    # torch.compile (inductor) of the denoiser's forward, CUDA runs only: on a CPU inductor computed wrong UNet
    # gradients (ddpo/pipeline.py). Each new input shape, grad mode or LoRA on/off state compiles once.
    compile: bool = False
    # UNet families (sd, sdxl) only: the UNet's weights in channels_last (NHWC) memory format, which GPU convolution
    # kernels prefer; the activations follow from the first convolution. A transformer family refuses it.
    channels_last: bool = False


@dataclass
class SampleConfig:
    num_steps: int = 50  # T: denoising steps = MDP steps
    # The policy's stochasticity: DDIM's eta (UNet families), the SDE noise level a (flow families; Flow-GRPO uses
    # 0.7). DDPO and GRPO need eta > 0; 0 is the deterministic sampler (DDIM, or the flow ODE).
    eta: float = 1.0
    flow_step: Literal["sde", "cps"] = "sde"  # flow families: Flow-GRPO's SDE, or coefficients-preserving sampling
    # SDE only inside a window of this many consecutive steps, deterministic elsewhere, and only the window trained
    # (Flow-GRPO-Fast, MixGRPO). 0: every step is stochastic and trained.
    sde_window: int = 0
    sde_window_starts: list[int] = field(default_factory=list)  # allowed window starts; empty = every position
    sde_window_schedule: Literal["random", "sliding"] = "random"  # a start drawn per epoch, or the list in turn
    eval_num_steps: int = 0  # steps of the evaluation's deterministic sampler; 0 = num_steps
    guidance_scale: float = 5.0
    batch_size: int = 1  # per process
    num_batches_per_epoch: int = 2  # per process
    # Batches sampled together: one denoiser call per step for this many consecutive batches (each with its own
    # prompts and noise, as when sampled alone; equal up to float rounding). Must divide num_batches_per_epoch.
    # Larger calls, less per-call overhead; that many batches' activations at once. 1 = one batch per call.
    batches_per_call: int = 1
    # Each prompt of a batch is drawn once and sampled this many times (with different noise). With
    # train.stat_buffer_size = train.stat_min_count = images_per_prompt, every sample's advantage is its reward
    # against the other images of the same prompt and the same policy (group-relative, as in GRPO). An epoch's
    # groups draw their prompts without replacement, and each group is normalised by itself (ddpo/advantages.py).
    images_per_prompt: int = 1
    negative_prompt: str = ""


@dataclass
class TrainConfig:
    # ddpo_is / ddpo_sf: DDPO; grpo: ddpo_is with group-relative advantages (Flow-GRPO); rwr / rwr_sparse:
    # reward-weighted regression; nft: DiffusionNFT (likelihood-free, any sampler).
    algorithm: Literal["ddpo_is", "ddpo_sf", "grpo", "rwr", "rwr_sparse", "nft"] = "ddpo_is"
    num_epochs: int = 100
    batch_size: int = 1  # per process, per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (times the trained timesteps)
    num_inner_epochs: int = 1
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    # Coupled to log-probs being a MEAN over latent dimensions (ddpo/logprob.py): with a sum, ratios explode.
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    # beta of a KL penalty towards the pretrained model (LoRA off), per step and per latent dimension like the
    # log-probs: loss += kl_coef * ||mu_theta - mu_ref||^2 / (2 sigma_t^2). 0 turns it off (the paper's DDPO).
    kl_coef: float = 0.0
    timestep_fraction: float = 1.0
    # DDPO: trained steps of a micro-batch per UNet call (one backward of their summed loss, the same gradient);
    # larger means fewer, larger calls and that many times the activation memory. 1 = one call per step.
    # "auto": as many as fit train.activation_memory_gib, measured once at the first update (ddpo/memory.py).
    timesteps_per_call: int | Literal["auto"] = "auto"
    # The activation memory timesteps_per_call=auto may fill, in GiB. "auto": half of the free GPU memory (after
    # the first optimizer step's gradients and moments), or on a CPU a quarter of the available RAM, at most 4 GiB.
    activation_memory_gib: float | Literal["auto"] = "auto"
    cfg: bool = True  # recompute log-probs with classifier-free guidance, as they were sampled
    rwr_temperature: float = 0.2  # beta in exp(r / beta), on normalised rewards
    rwr_sparse_quantile: float = 0.9  # rwr_sparse keeps samples with reward >= this quantile
    nft_beta: float = 1.0  # DiffusionNFT: how far the implicit positive/negative policies sit from the old one
    # The std advantages divide by: each reward's own group's ("group": a grpo group, or with per-prompt tracking the
    # prompt's recent rewards) or the epoch's ("batch", Flow-GRPO's global_std): a prompt whose images all score
    # alike then gets small advantages instead of its reward noise scaled up to unit size.
    group_std: Literal["group", "batch"] = "group"
    per_prompt_stat_tracking: bool = True
    stat_buffer_size: int = 16
    stat_min_count: int = 16
    # A step whose loss or gradient is NaN/inf: "error" stops the run (nothing is saved), "skip" leaves the weights
    # untouched and counts it as nonfinite_steps in metrics.jsonl.
    on_nonfinite: Literal["error", "skip"] = "error"


@dataclass
class PromptConfig:
    grammar: str = "shapes"  # a built-in grammar name or a grammar file
    # "mix": of each batch's prompts (with groups: each epoch's), round(mix_heldout x n) come from the held-out split
    # and the rest from the training split: train on what to fix while the reward keeps the rest where it is.
    split: Literal["train", "heldout", "all", "mix"] = "train"
    mix_heldout: float = 0.5  # with split=mix: the held-out share of the prompts drawn
    eval_every: int = 0  # epochs between held-out evaluations; 0 turns them off
    eval_split: Literal["train", "heldout", "all"] = "heldout"
    eval_num_prompts: int = 8  # distinct prompts (all of a smaller split)
    # images of each evaluation prompt, each from its own initial noise: K x the evaluation's time (sampled in
    # batches of sample.batch_size) for a judge whose standard error is 1/sqrt(K) of one image per prompt (the first
    # image of each prompt is the same for any K)
    eval_images_per_prompt: int = 1
    eval_seed: int = 1234


@dataclass
class RewardConfig:
    name: str = "jpeg_compressibility"
    kwargs: dict[str, Any] = field(default_factory=dict)
    executor: Literal["process", "thread", "inline"] = "process"  # process: overlaps sampling, no thread penalty
    on_nonfinite: Literal["error", "skip"] = "error"
    # Seconds one reward call (a batch of sample.batch_size images) may take before the run stops with an error
    # naming the reward and the prompts. 600 s leaves room for a 7B VLM on one GPU whose first call also loads it.
    timeout_s: float = 600.0
    # An evaluation-only judge (a reward name, e.g. shapes_accuracy, the Shapes evaluator; "" for none): scores the
    # evaluation's images beside the training reward every prompts.eval_every epochs (eval_score_* in metrics);
    # unused while evaluations are off (prompts.eval_every=0).
    eval_name: str = ""
    eval_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoggingConfig:
    output_dir: str = "runs"
    run_name: str = ""  # empty: a timestamped name
    save_every: int = 1  # epochs between checkpoints
    keep_last: int = 3
    tensorboard: bool = True
    wandb: bool = False
    sample_grid: bool = True
    progress: bool = True


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- loading


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("configs").iterdir() if p.name.endswith(".yaml"))


def preset_description(name: str) -> str:
    """The one-line description of a preset: its first line, `# description: ...` (a comment, so that the loader
    and the config it builds never see it). Empty if the preset has none."""
    first = (resources.files("configs") / f"{name}.yaml").read_text().partition("\n")[0]
    prefix = "# description:"
    return first[len(prefix):].strip() if first.startswith(prefix) else ""


def read_yaml(path_or_preset: str) -> dict[str, Any]:
    """Read a YAML file, or a preset shipped in `configs/` by name (with or without `.yaml`)."""
    path = Path(path_or_preset)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path_or_preset}: cannot read the config file ({err}); a config is a UTF-8 YAML "
                              "text file") from None
    else:
        name = path_or_preset.removesuffix(".yaml")
        preset = resources.files("configs") / f"{name}.yaml"
        if not preset.is_file():
            raise ConfigError(f"no config file or preset named {path_or_preset!r}; presets: {', '.join(list_presets())}")
        text = preset.read_text()
    data = parse_yaml(text, str(path_or_preset)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path_or_preset}: a config file must be a YAML mapping of sections, got {type(data).__name__}")
    return data


def parse_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load(text)`, with a syntax error (or a control character) as a ConfigError giving the line and
    column in `where` (a file name or an override)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None)
        if mark is None and isinstance(err, yaml.reader.ReaderError):  # a non-printable character
            line, column = text.count("\n", 0, err.position) + 1, err.position - text.rfind("\n", 0, err.position)
            code = err.character if isinstance(err.character, int) else ord(err.character)
            raise ConfigError(f"{where}: line {line}, column {column}: not YAML text (character U+{code:04X}); "
                              "a config is a UTF-8 YAML text file") from None
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{where}: {at}not valid YAML: {problem or err}") from None


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`["train.learning_rate=1e-4", "seed=3"]` -> [(["train", "learning_rate"], 1e-4), (["seed"], 3)]; values are
    parsed as YAML scalars, lists or mappings."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.learning_rate=1e-4)")
        parsed.append((key.split("."), parse_yaml(raw, f"override {item!r}") if raw != "" else ""))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of `data` with each `a.b.c=value` merged in, in turn: a dotted key sets one entry and keeps its
    siblings, and a mapping value merges into the mapping there, so `reward.kwargs.num_captions=4` and
    `reward.kwargs={num_captions: 4}` both keep the preset's captioner. An override that changes `reward.name`
    starts `reward.kwargs` afresh: the preset's were written for the other reward."""
    parsed = parse_overrides(overrides)
    data = copy.deepcopy(data)
    reward = data.get("reward")
    new_names = [value for path, value in parsed if path == ["reward", "name"]]
    if isinstance(reward, dict) and new_names and new_names[-1] != reward.get("name"):
        reward.pop("kwargs", None)
    for path, value in parsed:
        node = data
        for depth, part in enumerate(path[:-1]):
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[:depth + 1])} is not a section")
            node = node.setdefault(part, {})
        node[path[-1]] = _merged(node.get(path[-1]), value)
    return data


def _merged(old: Any, new: Any) -> Any:
    """`new` merged into `old` key by key where both are mappings; otherwise `new`."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    return {**old, **{key: _merged(old.get(key), value) for key, value in new.items()}}


def load_config(path_or_preset: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- preset or YAML file <- command-line overrides, then validated."""
    data = read_yaml(path_or_preset or DEFAULT_PRESET)
    data = apply_overrides(data, overrides or [])
    config = from_dict(Config, data, where="")
    from ddpo.validation import validate

    validate(config)
    return config


def from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and ill-typed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = unknown[0] if str(unknown[0]).isidentifier() else repr(unknown[0])  # quoted if odd (spaces, newlines)
        raise ConfigError(f"unknown key {where}{key}{_suggestion(where, str(unknown[0]), fields)}; valid keys in "
                          f"{where.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, where=f"{where}{name}.")
        else:
            kwargs[name] = _check_type(f"{where}{name}", value, hint)
    return cls(**kwargs)


def _suggestion(where: str, key: str, fields) -> str:
    """", did you mean train.num_epochs?" for the closest valid key of this section, if one is close."""
    import difflib

    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
    return f" (did you mean {where}{close[0]}?)" if close else ""


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads `no`, `off`, `yes`, `on` as booleans
            value = next((word for word in _YAML_BOOL_WORDS[value] if word in args), value)
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _check_type(key, value, inner[0])
        for option in inner:  # e.g. int | Literal["auto"]: the first that accepts the value
            try:
                return _check_type(key, value, option)
            except ConfigError:
                if isinstance(option, type) and isinstance(value, option) and not isinstance(value, bool):
                    raise  # the right type, a bad value (a float that is not finite): that option's message
        raise ConfigError(f"{key}={value!r} is not valid; give {' or '.join(map(_describe, inner))}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        _check_plain(key, value)
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
    if hint is float and isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")
        return value
    if hint is Any or (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{key} must be of type {hint.__name__}, got {value!r} ({type(value).__name__})")


def _describe(hint: Any) -> str:
    """How an error names one option of a union: "an int", "a float", "'auto'"."""
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(choice) for choice in typing.get_args(hint))
    name = getattr(hint, "__name__", str(hint))
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _check_plain(key: str, value: Any) -> None:
    """Mappings such as reward.kwargs hold plain data only (text, numbers, booleans, null, lists, mappings with
    text keys): what the config file, `config.yaml` of a run and the reward server all carry the same way."""
    if isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(name, str):
                raise ConfigError(f"{key} has the key {name!r} ({type(name).__name__}); keys must be text")
            _check_plain(f"{key}.{name}", item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(f"{key}[{i}]", item)
    elif not isinstance(value, _PLAIN):
        hint = " (YAML reads an unquoted date as a date: quote it)" if isinstance(value, datetime.date) else ""
        raise ConfigError(f"{key}={value!r} is a {type(value).__name__}{hint}; it must be plain data: text, a number, "
                          "true/false, null, a list or a mapping")


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def config_from_file(path: Path) -> Config:
    """Load a resolved config written by `save_config` (a run folder's or a checkpoint's)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file ({err})") from None
    config = from_dict(Config, parse_yaml(text, str(path)) or {}, where="")
    from ddpo.validation import validate

    validate(config)
    return config
