"""ddpo against TRL 0.23.1's DDPOTrainer, side by side at identical settings, alternating runs.

Both train the same tiny Stable Diffusion pipeline, built here in code and saved once as a diffusers folder: a
UNet2DConditionModel of block widths (32, 64) with 2 layers per block and cross-attention 32 (diffusers' own test
UNet), 8x8 latents, a 4-block VAE (64 px images) and a 2-layer CLIP text encoder. Per epoch: 2 batches x 4 images
x 10 DDIM steps with CFG 5 and eta 1; train batch 4, 1 inner epoch, one optimizer step per micro-batch (TRL's
gradient accumulation over the 10 timesteps); LoRA rank 4 (alpha 4, Gaussian init) on to_q/to_k/to_v/to_out.0
(23,040 trained parameters); AdamW lr 3e-4; clip range 1e-4; JPEG compressibility computed synchronously in the
training process; per-prompt statistics (buffer 16, min count 16) over the DDPO paper's 45 animal prompts.

    python benchmarks/peers.py --setup-trl /tmp/trl-venv        # create TRL's venv (PyPI), then compare
    python benchmarks/peers.py --trl-venv /tmp/trl-venv         # compare with an existing one
    python benchmarks/peers.py --no-trl --threads 1 --runs 1    # only ddpo's side
    python benchmarks/peers.py --trl-venv /tmp/trl-venv --timesteps-per-call 2   # ddpo's calls: 4 x 2 x CFG
    python benchmarks/peers.py --trl-venv /tmp/trl-venv --timesteps-per-call 3 --batches-per-call 1 2  # a row each
    taskset -c 0,1 python benchmarks/peers.py --trl-python python3 ...  # TRL importable by python3 (PYTHONPATH)
    python benchmarks/peers.py --trl-python python3 --device cuda --scale sd15 --mixed-precision fp16 \\
        --threads 4 --timesteps-per-call 1 fit                  # SD 1.5 scale on a GPU (random weights, 512 px)

--scale sd15 builds the pipeline from SD 1.5's published unet/vae/text_encoder configs instead (859.5M + 83.7M +
123.1M parameters, random weights, 64x64 latents, 512 px) with the same tokenizer, the same settings otherwise;
on --device cuda both sides report the peak GPU memory of the process (torch's allocator: allocated and reserved
MiB), and `fit` chooses ddpo's timesteps per call from the run with 1: the most whose estimated peak stays within
--gpu-memory-budget of the GPU's memory. --device cpu hides any GPU from both sides.

--setup-trl installs torch 2.13.0 first and alone (on a CPU-only machine whose index is PyPI add --torch-index
https://download.pytorch.org/whl/cpu), then TRL 0.23.1 (the last release with DDPOTrainer) with the diffusers,
transformers, peft and accelerate versions of the venv running this script. ddpo runs with
`train.timesteps_per_call` (default 10: the 10 steps of a micro-batch in one UNet call of batch 4 x 10 x 2);
TRL makes one call per step (batch 4 x 2). `--batches-per-call` sets ddpo's `sample.batches_per_call` (default 1:
one sampling call per batch and step, as TRL; 2: both batches of an epoch in one call of 2 x 4 x 2 per step). TRL needs `accelerate.PartialState()` before its pipeline is built,
`mixed_precision="no"` on a CPU, and its reward is synchronous (`async_reward_computation=False`); ddpo's reward
runs inline too (`reward.executor=inline`). Neither shows a progress bar.

Each run is a fresh process (`ddpo train ...` / TRL's trainer) of `--epochs` epochs; epoch 1 warms up, the
steady epoch time of a run is the median of the others; a row is the median over `--runs` runs. Runs alternate
(ddpo, TRL, TRL, ddpo, ...) so both see the same machine; the ratio is the median of the pairwise ratios.
Peak RSS is each worker process's own maximum resident set (VmHWM, read by the worker as it ends).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRL_VERSION = "0.23.1"
# TRL's venv gets the versions of these that ddpo's venv has, so both implementations run the very same UNet,
# attention, LoRA and optimizer code. Checked working with TRL 0.23.1 (import, sampling, training): diffusers
# 0.42.1, transformers 5.24.0, peft 0.21.2, accelerate 1.15.0. torch is the CPU wheel that constraints.txt pins.
SHARED_PACKAGES = ("diffusers", "transformers", "peft", "accelerate")
SETTINGS = dict(num_steps=10, guidance_scale=5.0, eta=1.0, sample_batch_size=4, num_batches=2, train_batch_size=4,
                inner_epochs=1, lora_rank=4, learning_rate=3e-4, stat_buffer=16, stat_min_count=16)
SAMPLES_PER_EPOCH = SETTINGS["sample_batch_size"] * SETTINGS["num_batches"]


# ---------------------------------------------------------------------------------------------- the model


# SD 1.5's published configs (stable-diffusion-v1-5/stable-diffusion-v1-5: unet/, vae/, text_encoder/config.json),
# for --scale sd15: 860M-parameter UNet, 84M VAE, 123M CLIP ViT-L/14 text encoder, 64x64 latents <-> 512 px.
SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), center_input_sample=False,
    cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                               "DownBlock2D"),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD15_VAE = dict(
    act_fn="silu", block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(
    hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072, max_position_embeddings=77,
    num_attention_heads=12, num_hidden_layers=12, projection_dim=768, vocab_size=49408)


def build_peers_pipeline(folder: str | Path, seed: int = 0, scale: str = "tiny", device: str = "cpu") -> Path:
    """Save the benchmark's random StableDiffusionPipeline to `folder`: the tiny one of the module docstring, or
    (scale "sd15") one built from SD 1.5's published configs with random weights (nothing is downloaded; the
    tokenizer is the tiny one, whose ids all lie inside CLIP's vocabulary). `device`: where the weights are
    initialised (cuda is much faster for the 1B parameters of sd15); they are saved in fp32 either way."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ddpo.tiny import TINY_VOCAB_SIZE, write_tiny_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        if scale == "sd15":
            unet = UNet2DConditionModel(**SD15_UNET)
            vae = AutoencoderKL(**SD15_VAE)
            text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=0, eos_token_id=1,
                                                        pad_token_id=1))
        else:
            unet = UNet2DConditionModel(
                sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            )
            vae = AutoencoderKL(  # 4 blocks: 8x downsampling, as SD's VAE (8x8 latents <-> 64 px)
                in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=1, norm_num_groups=8, sample_size=64,
            )
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            ))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tmp), model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to("cpu").save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def animal_prompts() -> list[str]:
    from prompts import load_grammar

    return [p.text for p in load_grammar("simple_animals").enumerate(None)]


# ---------------------------------------------------------------------------------------------- memory


def write_peak_rss() -> None:
    """A worker's own peak resident set (VmHWM, kernel-exact, since its exec) into $PEERS_PEAK_FILE, in MiB.

    The OS's accounting of a finished child (wait4's ru_maxrss) is not that: it also counts the parent's resident
    set at the fork, and this script's parent has built the model (5 GiB at SD 1.5 scale)."""
    path = os.environ.get("PEERS_PEAK_FILE")
    if not path:
        return
    try:
        kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return
    Path(path).write_text(f"{kib / 1024:.1f}\n")


MIB = 1024 ** 2


def cuda_sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def cuda_memory_start() -> dict:
    """Before an epoch on CUDA: the process's peak so far (model loading), what is allocated now (weights,
    optimizer state), and the peak counters reset, so that `cuda_memory_end` gives the epoch's own peak."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    memory = {"cuda_peak_before_mib": torch.cuda.max_memory_allocated() / MIB,
              "cuda_reserved_before_mib": torch.cuda.max_memory_reserved() / MIB,
              "cuda_allocated_start_mib": torch.cuda.memory_allocated() / MIB}
    torch.cuda.reset_peak_memory_stats()
    return memory


def cuda_memory_end(memory: dict) -> dict:
    """The epoch's peak allocated (tensors) and reserved (the caching allocator's, what nvidia-smi sees) MiB."""
    import torch

    if not memory:
        return {}
    return {**memory, "cuda_peak_mib": torch.cuda.max_memory_allocated() / MIB,
            "cuda_reserved_mib": torch.cuda.max_memory_reserved() / MIB}


# ---------------------------------------------------------------------------------------------- TRL's side


def trl_packages() -> list[str]:
    from importlib.metadata import version

    return [f"trl=={TRL_VERSION}", *(f"{name}=={version(name)}" for name in SHARED_PACKAGES)]


def setup_trl(venv: Path, torch_index: str | None = None) -> Path:
    """Create `venv` with TRL 0.23.1 from PyPI and this venv's diffusers/transformers/peft/accelerate; torch first
    and alone, pinned to 2.13.0 (constraints.txt): an unpinned resolve pulls a multi-GB CUDA build."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0", *(["--index-url", torch_index] if torch_index else [])], check=True)
    subprocess.run([*pip, "-c", str(REPO / "constraints.txt"), *trl_packages()], check=True)
    return python


def trl_worker(args) -> None:
    """Run TRL's DDPOTrainer for `args.epochs` epochs in this process (TRL's venv); print one JSON line per epoch."""
    import io
    import random
    import warnings

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from accelerate import PartialState
    from PIL import Image

    PartialState()  # TRL's pipeline logs through accelerate's logger, which needs the state first
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    s = SETTINGS
    prompts = json.loads(Path(args.prompts).read_text())
    rng = random.Random(0)

    def prompt_fn():
        return rng.choice(prompts), {}

    def jpeg_compressibility(images, prompts, metadata):  # the same as ddpo's rewards/jpeg.py
        pixels = (images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round()
        sizes = []
        for image in pixels.astype(np.uint8):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=95)
            sizes.append(buffer.tell() / 1000)
        return -torch.tensor(sizes, dtype=torch.float32), {}

    config = DDPOConfig(
        num_epochs=args.epochs, seed=0, mixed_precision=args.mixed_precision, log_with=None, save_freq=10**9,
        project_kwargs={"project_dir": args.workdir, "logging_dir": args.workdir},
        sample_num_steps=s["num_steps"], sample_eta=s["eta"], sample_guidance_scale=s["guidance_scale"],
        sample_batch_size=s["sample_batch_size"], sample_num_batches_per_epoch=s["num_batches"],
        train_batch_size=s["train_batch_size"], train_num_inner_epochs=s["inner_epochs"],
        train_gradient_accumulation_steps=1, train_learning_rate=s["learning_rate"],
        per_prompt_stat_tracking=True, per_prompt_stat_tracking_buffer_size=s["stat_buffer"],
        per_prompt_stat_tracking_min_count=s["stat_min_count"], async_reward_computation=False,
    )
    pipeline = DefaultDDPOStableDiffusionPipeline(args.model, use_lora=True)
    trainer = DDPOTrainer(config, jpeg_compressibility, prompt_fn, pipeline)
    pipeline.set_progress_bar_config(disable=True)  # as ddpo's logging.progress=false
    trained = sum(p.numel() for p in pipeline.unet.parameters() if p.requires_grad)
    spent = {"sample_s": 0.0, "train_s": 0.0}

    def timed(method, key):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                spent[key] += time.perf_counter() - start
        return wrapper

    trainer._generate_samples = timed(trainer._generate_samples, "sample_s")
    trainer._train_batched_samples = timed(trainer._train_batched_samples, "train_s")
    global_step = 0
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version

    (Path(args.workdir) / "packages.json").write_text(json.dumps(
        [f"{name}=={version(name)}" for name in ("trl", *SHARED_PACKAGES, "torch")]))
    with open(Path(args.workdir) / "epochs.jsonl", "w") as out:
        for epoch in range(args.epochs):
            spent.update(sample_s=0.0, train_s=0.0)
            memory = cuda_memory_start()
            start, cpu = time.perf_counter(), time.process_time()
            global_step = trainer.step(epoch, global_step)
            cuda_sync()
            row = {"epoch": epoch + 1, "epoch_s": time.perf_counter() - start, "epoch_cpu_s": time.process_time() - cpu,
                   **spent, "trained_params": trained, **cuda_memory_end(memory)}
            out.write(json.dumps(row) + "\n")
            out.flush()
    write_peak_rss()


# ---------------------------------------------------------------------------------------------- ddpo's side


def ddpo_worker(argv: list[str]) -> None:
    """`ddpo train ARGV` in this process, each epoch's metrics row also holding its CPU seconds (`epoch_cpu_s`,
    all threads), which other jobs on the machine disturb less than wall time."""
    sys.path.insert(0, str(REPO))
    import ddpo.trainer
    from ddpo.cli import main

    run_epoch = ddpo.trainer._run_epoch

    def timed(*args, **kwargs):
        memory = cuda_memory_start()
        cpu = time.process_time()
        row = run_epoch(*args, **kwargs)  # its epoch_s ends on host values (metrics): the GPU has finished
        row["epoch_cpu_s"] = time.process_time() - cpu
        row.update(cuda_memory_end(memory))
        return row

    ddpo.trainer._run_epoch = timed
    code = main(argv)
    write_peak_rss()
    sys.exit(code)


def ddpo_command(model: str, workdir: str, run_name: str, epochs: int, timesteps_per_call: int,
                 mixed_precision: str = "no", batches_per_call: int = 1) -> list[str]:
    s = SETTINGS
    return [sys.executable, __file__, "--ddpo-worker", "train", "tiny_cpu",
            f"model.pretrained={model}", f"model.lora_rank={s['lora_rank']}", f"model.lora_alpha={s['lora_rank']}",
            f"model.mixed_precision={mixed_precision}",
            f"sample.num_steps={s['num_steps']}", f"sample.guidance_scale={s['guidance_scale']}",
            f"sample.eta={s['eta']}", f"sample.batch_size={s['sample_batch_size']}",
            f"sample.num_batches_per_epoch={s['num_batches']}", f"sample.batches_per_call={batches_per_call}",
            f"train.batch_size={s['train_batch_size']}",
            f"train.num_inner_epochs={s['inner_epochs']}", "train.gradient_accumulation_steps=1",
            f"train.learning_rate={s['learning_rate']}", "train.per_prompt_stat_tracking=true",
            f"train.stat_buffer_size={s['stat_buffer']}", f"train.stat_min_count={s['stat_min_count']}",
            f"train.timesteps_per_call={timesteps_per_call}", f"train.num_epochs={epochs}",
            "prompts.grammar=simple_animals", "prompts.split=all", "prompts.eval_every=0",
            "reward.name=jpeg_compressibility", "reward.executor=inline",  # synchronous, like TRL's
            f"logging.output_dir={workdir}", f"logging.run_name={run_name}", f"logging.save_every={10**6}",
            "logging.keep_last=1", "logging.sample_grid=false", "logging.tensorboard=false",
            "logging.progress=false"]


# ---------------------------------------------------------------------------------------------- measuring


def run_measured(command: list[str], threads: int, log: Path, omp_wait_policy: str | None = None,
                 device: str = "cpu") -> tuple[int, float]:
    """Run `command` with `threads` torch threads; (exit code, the child's peak RSS in MiB: its own VmHWM, see
    `write_peak_rss`; without /proc, wait4's ru_maxrss). On `device` cpu the child sees no GPU
    (CUDA_VISIBLE_DEVICES empty), so neither side can pick one up on a machine that has one."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    env.pop("OMP_WAIT_POLICY", None)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    peak_file = log.with_suffix(".peak")
    peak_file.unlink(missing_ok=True)
    env["PEERS_PEAK_FILE"] = str(peak_file)
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    peak = float(peak_file.read_text()) if peak_file.exists() else usage.ru_maxrss / 1024
    return proc.returncode, peak


def torch_version() -> str:
    from importlib.metadata import version

    return version("torch")


def steady(epoch_times: list[float]) -> float:
    """The median epoch time after the first (warm-up) epoch."""
    return statistics.median(epoch_times[1:] if len(epoch_times) > 1 else epoch_times)


def one_run(variant: tuple[str, int | None, int | None], threads: int, args, workdir: Path, model: Path,
            prompts_file: Path, trl_python: Path | None, index: int) -> dict:
    """One fresh process of `variant` ("ddpo", timesteps_per_call, batches_per_call) or ("trl", None, None)."""
    impl, k, m = variant
    name = f"{impl}{k or ''}{f'b{m}' if m and m > 1 else ''}-t{threads}-r{index}"
    log = workdir / f"{name}.log"
    if impl == "ddpo":
        command = ddpo_command(str(model), str(workdir / "runs"), name, args.epochs, k, args.mixed_precision, m)
    else:
        command = [str(trl_python), __file__, "--trl-worker", "--threads", str(threads), "--epochs", str(args.epochs),
                   "--model", str(model), "--prompts", str(prompts_file), "--workdir", str(workdir / name),
                   "--mixed-precision", args.mixed_precision]
    code, peak = run_measured(command, threads, log, args.omp_wait_policy, args.device)
    if code != 0:
        raise RuntimeError(f"{impl} run failed (exit {code}); last lines of {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-25:]))
    if impl == "ddpo":
        rows = [json.loads(line) for line in (workdir / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    else:
        rows = [json.loads(line) for line in (workdir / name / "epochs.jsonl").read_text().splitlines()]
        packages = json.loads((workdir / name / "packages.json").read_text())
        expected = trl_packages() + [f"torch=={torch_version()}"]
        if packages != expected:
            print(f"warning: TRL's venv has {packages}, not {expected}: the two sides run different library code",
                  flush=True)
    times = [r["epoch_s"] for r in rows]
    if len(times) != args.epochs:
        raise RuntimeError(f"{impl}: {len(times)} epochs recorded, expected {args.epochs} ({log})")
    epoch_s = steady(times)
    result = {"impl": impl, "timesteps_per_call": k, "batches_per_call": m, "threads": threads, "run": index, "epoch_times": times,
              "epoch_s": epoch_s, "epoch_cpu_s": steady([r["epoch_cpu_s"] for r in rows]),
              "sample_s": steady([r["sample_s"] for r in rows]),
              "train_s": steady([r["train_s"] for r in rows]), "samples_per_s": SAMPLES_PER_EPOCH / epoch_s,
              "peak_rss_mib": peak}
    if "cuda_peak_mib" in rows[0]:  # the process's peak: model loading (before epoch 1) or any epoch
        result.update(
            cuda_peak_mib=max([rows[0]["cuda_peak_before_mib"]] + [r["cuda_peak_mib"] for r in rows]),
            cuda_reserved_mib=max([rows[0]["cuda_reserved_before_mib"]] + [r["cuda_reserved_mib"] for r in rows]),
            cuda_weights_mib=rows[-1]["cuda_allocated_start_mib"],  # weights and optimizer state between epochs
            cuda_epoch_extra_mib=max(r["cuda_peak_mib"] - r["cuda_allocated_start_mib"] for r in rows))
    return result


def fit_timesteps_per_call(one_step: dict, budget_mib: float, num_steps: int) -> int:
    """The most timesteps per call (at most `num_steps`) whose estimated epoch peak fits `budget_mib`, from a run
    with 1 per call: weights and optimizer state, plus K times that run's largest per-epoch addition (its
    training call's activations, K x as many rows). An estimate: a K-step call keeps K steps' activations alive."""
    spare = budget_mib - one_step["cuda_weights_mib"]
    return max(1, min(num_steps, int(spare // one_step["cuda_epoch_extra_mib"])))


def variant_of(run: dict) -> tuple[str, int | None, int | None]:
    """(impl, timesteps_per_call, batches_per_call) of a run or row; runs recorded before batches_per_call: 1."""
    return run["impl"], run["timesteps_per_call"], run.get("batches_per_call", 1 if run["impl"] == "ddpo" else None)


def summarise(results: list[dict], variants: list[tuple[str, int | None, int | None]],
              threads_list: list[int]) -> list[dict]:
    """A row per variant and thread count: medians over its runs; for ddpo, the median of the ratios TRL's epoch
    time / ddpo's over the pairs of runs with the same index (run next to each other)."""
    rows = []
    for impl, k, m in variants:
        for threads in threads_list:
            runs = [r for r in results if variant_of(r) == (impl, k, m) and r["threads"] == threads]
            if not runs:  # every run of it failed
                continue
            epoch_s = statistics.median(r["epoch_s"] for r in runs)
            row = {"impl": impl, "timesteps_per_call": k, "batches_per_call": m, "threads": threads, "runs": len(runs),
                   "epoch_s": epoch_s,
                   "epoch_s_min": min(r["epoch_s"] for r in runs), "epoch_s_max": max(r["epoch_s"] for r in runs),
                   "epoch_cpu_s": statistics.median(r["epoch_cpu_s"] for r in runs),
                   "sample_s": statistics.median(r["sample_s"] for r in runs),
                   "train_s": statistics.median(r["train_s"] for r in runs),
                   "samples_per_s": SAMPLES_PER_EPOCH / epoch_s,
                   "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs)}
            for key in ("cuda_peak_mib", "cuda_reserved_mib"):
                if all(key in r for r in runs):
                    row[key] = statistics.median(r[key] for r in runs)
            trl = {r["run"]: r for r in results if r["impl"] == "trl" and r["threads"] == threads}
            if impl == "ddpo" and trl:
                ratios = [trl[r["run"]]["epoch_s"] / r["epoch_s"] for r in runs if r["run"] in trl]
                row["speedup_vs_trl"] = statistics.median(ratios)
                row["speedup_vs_trl_runs"] = ratios
                row["cpu_ratio_vs_trl"] = statistics.median(trl[r["run"]]["epoch_cpu_s"] / r["epoch_cpu_s"]
                                                            for r in runs if r["run"] in trl)
            one = [r for r in rows if variant_of(r) == (impl, k, m) and r["threads"] == 1]
            if threads != 1 and one:
                row["speedup_vs_1_thread"] = row["samples_per_s"] / one[0]["samples_per_s"]
            rows.append(row)
    return rows


def label(row: dict) -> str:
    if row["impl"] == "trl":
        return f"TRL {TRL_VERSION} DDPOTrainer"
    m = variant_of(row)[2]
    return f"ddpo (this project), timesteps_per_call={row['timesteps_per_call']}" + (
        f", batches_per_call={m}" if m != 1 else "")


def markdown(rows: list[dict]) -> str:
    gpu = any("cuda_peak_mib" in r for r in rows)
    lines = ["| implementation | threads | steady epoch s (min-max) | sampling s | training s | samples/s | vs TRL "
             "| vs 1 thread | epoch CPU s (vs TRL) | peak RSS MiB |"
             + (" peak GPU MiB allocated / reserved |" if gpu else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for r in rows:
        ratio = f"{r['speedup_vs_trl']:.2f}x" if "speedup_vs_trl" in r else ""
        threads = f"{r['speedup_vs_1_thread']:.2f}x" if "speedup_vs_1_thread" in r else ""
        cpu = f"{r['epoch_cpu_s']:.3f}" + (f" ({r['cpu_ratio_vs_trl']:.2f}x)" if "cpu_ratio_vs_trl" in r else "")
        memory = ""
        if gpu:
            memory = f" {r['cuda_peak_mib']:.0f} / {r['cuda_reserved_mib']:.0f} |" if "cuda_peak_mib" in r else " |"
        lines.append(f"| {label(r)} | {r['threads']} | {r['epoch_s']:.3f} ({r['epoch_s_min']:.3f}-{r['epoch_s_max']:.3f}) "
                     f"| {r['sample_s']:.3f} | {r['train_s']:.3f} | {r['samples_per_s']:.2f} | {ratio} | {threads} "
                     f"| {cpu} | {r['peak_rss_mib']:.0f} |{memory}")
    return "\n".join(lines)


def resolve_fit(results: list[dict], args) -> int:
    """'fit': from the first finished ddpo run with 1 timestep per call."""
    import torch

    one = next((r for r in results if r["impl"] == "ddpo" and r["timesteps_per_call"] == 1
                and variant_of(r)[2] == 1), None)
    if one is None:
        raise RuntimeError("'fit' needs a finished ddpo run with 1 timestep per call")
    budget = args.gpu_memory_budget * torch.cuda.get_device_properties(0).total_memory / MIB
    return fit_timesteps_per_call(one, budget, SETTINGS["num_steps"])


def machine(device: str) -> str:
    """The processor (and GPU) the numbers were measured on."""
    import platform

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        import torch

        cpu += f"; {torch.cuda.get_device_name(0)}"
    return cpu


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--setup-trl", metavar="DIR", type=Path, help=f"create a venv with TRL {TRL_VERSION} in DIR, "
                        "then use it")
    parser.add_argument("--torch-index", metavar="URL", help="with --setup-trl: the index to take torch 2.13.0 "
                        "from (a CPU-only machine whose index is PyPI: https://download.pytorch.org/whl/cpu)")
    parser.add_argument("--trl-venv", metavar="DIR", type=Path, help="an existing venv with TRL (from --setup-trl)")
    parser.add_argument("--trl-python", metavar="PYTHON", type=Path, help="an interpreter that imports TRL "
                        f"{TRL_VERSION} as it is (e.g. with PYTHONPATH set), instead of --trl-venv; ddpo runs under "
                        "the interpreter running this script")
    parser.add_argument("--no-trl", action="store_true", help="run ddpo's side only")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (default: 1 2)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each implementation per thread count")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run; the first warms up (default 6)")
    parser.add_argument("--timesteps-per-call", nargs="+", default=["10"],
                        help="ddpo's train.timesteps_per_call; several values: a ddpo row each (default 10: all "
                        "steps of a micro-batch in one call). 'fit' (CUDA, after 1 in the list): the most that fit "
                        "--gpu-memory-budget, estimated from the run with 1")
    parser.add_argument("--batches-per-call", type=int, nargs="+", default=[1],
                        help="ddpo's sample.batches_per_call; several values: a ddpo row for each with each "
                        "--timesteps-per-call (default 1: one sampling call per batch and step, as TRL's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: both sides see no GPU (CUDA_VISIBLE_DEVICES empty); cuda: both use the GPU")
    parser.add_argument("--scale", choices=["tiny", "sd15"], default="tiny",
                        help="tiny: the module docstring's pipeline; sd15: SD 1.5's published configs with random "
                        "weights (512 px; for a GPU)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no",
                        help="both sides' mixed precision (frozen weights in that dtype, LoRA in fp32)")
    parser.add_argument("--gpu-memory-budget", type=float, default=0.85,
                        help="with 'fit': the share of the GPU's memory a run may take (default 0.85)")
    parser.add_argument("--omp-wait-policy", choices=["active", "passive"],
                        help="OMP_WAIT_POLICY for both sides (default: unset, the OpenMP runtime's own). On a machine "
                        "shared with other busy processes, 2 threads under the default policy can take 10-100x longer "
                        "per epoch; passive keeps them from spinning")
    parser.add_argument("--workdir", type=Path, help="keep the model, logs and runs here (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table as markdown here")
    # internal: TRL's side, run in TRL's venv by this script
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--ddpo-worker"]:
        ddpo_worker(argv[1:])
    args = parser.parse_args(argv)
    if args.trl_worker:
        args.threads = args.threads[0]
        args.workdir = str(args.workdir)
        trl_worker(args)
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    trl_python = None
    if args.setup_trl:
        trl_python = setup_trl(args.setup_trl, args.torch_index)
    elif args.trl_venv:
        trl_python = args.trl_venv / "bin" / "python"
    elif args.trl_python:
        trl_python = args.trl_python
    elif not args.no_trl:
        parser.error("give --setup-trl DIR, --trl-venv DIR, --trl-python PYTHON or --no-trl")
    ks = [k if k == "fit" else int(k) for k in args.timesteps_per_call]
    if "fit" in ks and (args.device != "cuda" or 1 not in ks[:ks.index("fit")]):
        parser.error("--timesteps-per-call fit needs --device cuda and 1 before it in the list")
    bad = [m for m in args.batches_per_call if m < 1 or SETTINGS["num_batches"] % m]
    if bad:
        parser.error(f"--batches-per-call {bad}: each must divide the {SETTINGS['num_batches']} batches per epoch")
    variants = [("ddpo", k, m) for k in ks for m in args.batches_per_call]
    variants += [] if args.no_trl else [("trl", None, None)]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        model = workdir / "model"
        if not (model / "model_index.json").exists():  # a --workdir kept from an earlier run keeps its model
            build_peers_pipeline(model, scale=args.scale, device=args.device)
        prompts_file = workdir / "prompts.json"
        prompts_file.write_text(json.dumps(animal_prompts()))
        results, failed = [], []
        for threads in args.threads:
            for index in range(args.runs):
                distinct = list(dict.fromkeys(variants))
                for variant in distinct if index % 2 == 0 else distinct[::-1]:  # ABBA: no side always goes first
                    if variant[:2] == ("ddpo", "fit"):
                        try:
                            fitted = ("ddpo", resolve_fit(results, args), variant[2])
                        except RuntimeError as err:
                            print(err, flush=True)
                            continue
                        print(f"timesteps_per_call fit: {fitted[1]}", flush=True)
                        variants[variants.index(variant)] = fitted
                        if variants.count(fitted) > 1:  # already among the runs
                            continue
                        variant = fitted
                    try:
                        result = one_run(variant, threads, args, workdir, model, prompts_file, trl_python, index)
                    except RuntimeError as err:  # e.g. out of GPU memory: reported, the other runs go on
                        print(f"{variant} threads={threads} run={index + 1} failed: {err}", flush=True)
                        failed.append({"impl": variant[0], "timesteps_per_call": variant[1],
                                       "batches_per_call": variant[2], "threads": threads,
                                       "run": index, "error": str(err)[-2000:]})
                        continue
                    results.append(result)
                    if args.json:  # so far: what a run cut short leaves
                        args.json.write_text(json.dumps({"partial": True, "runs": results}, indent=1) + "\n")
                    print(f"{label(result)} threads={threads} run={index + 1}: steady epoch {result['epoch_s']:.3f} s "
                          f"(sampling {result['sample_s']:.3f} s, training {result['train_s']:.3f} s), "
                          f"peak RSS {result['peak_rss_mib']:.0f} MiB"
                          + (f", peak GPU {result['cuda_peak_mib']:.0f} MiB allocated, "
                             f"{result['cuda_reserved_mib']:.0f} reserved" if "cuda_peak_mib" in result else ""),
                          flush=True)
        variants = [v for v in dict.fromkeys(variants)  # 'fit' may have resolved to a value also asked for
                    if any(variant_of(r) == v for r in results)]
        rows = summarise(results, variants, args.threads)
    table = markdown(rows)
    print(table)
    report = {"settings": {**SETTINGS, "epochs_per_run": args.epochs, "runs": args.runs,
                           "ddpo_timesteps_per_call": sorted({k for impl, k, _ in variants if impl == "ddpo"}),
                           "ddpo_batches_per_call": args.batches_per_call,
                           "omp_wait_policy": args.omp_wait_policy, "device": args.device, "scale": args.scale,
                           "mixed_precision": args.mixed_precision, "cpu_affinity": sorted(os.sched_getaffinity(0)),
                           "machine": machine(args.device),
                           "packages": trl_packages() + ["torch==" + torch_version()]},
              "load_before": load_before, "load_after": os.getloadavg(), "rows": rows, "runs": results,
              "failed": failed}
    print(f"1-minute load average: {load_before[0]:.2f} before, {report['load_after'][0]:.2f} after")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return report


if __name__ == "__main__":
    main()
