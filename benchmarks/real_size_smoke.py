"""Real-size smoke benchmark: one sampling step and one LoRA training step on published denoiser configs.

Builds each denoiser from its published config.json (hard-coded below, so nothing is downloaded) with random
weights, directly in bf16 (torch's default dtype is bf16 while the modules are constructed, so no fp32 copy of
the weights is ever materialised; the one fp32 transient is SD3's sin-cos pos_embed table, which diffusers
builds in fp32, 0.84 GiB, before it is cast like torch_dtype= would), then times:

* one sampling step: a no-grad forward at batch 2 (cond + uncond, as with classifier-free guidance);
* one LoRA training step: peft LoRA (rank 4, alpha 4) on the attention projections added with
  `model.add_adapter` (as the trainer does: base frozen, gaussian A, zero B), batch-1 forward, MSE loss,
  backward, AdamW step on the LoRA parameters only. Gradient checkpointing (--gradient-checkpointing auto):
  on for the transformers (SD3.5, FLUX: long token sequences, 12B FLUX needs it on smaller GPUs), off for the
  UNets (the trainer's default, model.gradient_checkpointing=false).

Peak memory is measured per phase (build, sampling, LoRA setup, training) over the process baseline taken
before the model is built, so weights are included: on CPU the kernel's exact RSS high-water mark (VmHWM,
reset per phase through /proc/self/clear_refs), on CUDA torch.cuda.max_memory_allocated. Each model runs in
a fresh subprocess, so its peak is its own.

    python benchmarks/real_size_smoke.py --threads 2                        # CPU, 512 px: sd15, sdxl, sd35m
    python benchmarks/real_size_smoke.py --threads 1 --merge                # add 1-thread rows to the results
    python benchmarks/real_size_smoke.py --tiny --in-process                # reduced configs, seconds (tests)
    python benchmarks/real_size_smoke.py --device cuda --resolution 1024 --models sd15,sdxl,sd35m,flux \\
        --out benchmarks/results/real_size_smoke_cuda.json                  # GPU, 1024 px, FLUX included

FLUX.1-dev (12B parameters, over 22 GiB of bf16 weights) is skipped on CPU unless --include-flux: with LoRA,
activations and optimizer state it cannot fit in the RAM of a 24 GiB machine. On cores other jobs also use,
--threads 1 gives steady times; 2 threads on 2 busy cores were 2-4x slower than 1 (OpenMP threads wait on
each other), see benchmarks/results/real_size_smoke.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

GIB = 1024 ** 3
UNET, SD3, FLUX = "UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TRANSFORMER_TARGETS = UNET_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_TINY_UNET = dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, sample_size=8)
# name -> (diffusers class, hub repo, published size in billions, text tokens, published config, tiny overrides)
MODELS: dict[str, tuple[str, str, float, int, dict[str, Any], dict[str, Any]]] = {
    "sd15": (UNET, "stable-diffusion-v1-5/stable-diffusion-v1-5", 0.86, 77, dict(
        act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
        cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                   "CrossAttnDownBlock2D", "DownBlock2D"],
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
        mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
        dict(_TINY_UNET, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])),
    "sdxl": (UNET, "stabilityai/stable-diffusion-xl-base-1.0", 2.6, 77, dict(
        act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
        attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
        cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
        mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4,
        projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True),
        dict(_TINY_UNET, attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2], addition_time_embed_dim=8,
             projection_class_embeddings_input_dim=8 * 6 + 16, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
             up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])),
    "sd35m": (SD3, "stabilityai/stable-diffusion-3.5-medium", 2.5, 77 + 256, dict(
        attention_head_dim=64, caption_projection_dim=1536, dual_attention_layers=list(range(13)), in_channels=16,
        joint_attention_dim=4096, num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2,
        pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm", sample_size=128),
        dict(attention_head_dim=8, caption_projection_dim=16, dual_attention_layers=[0], joint_attention_dim=32,
             num_attention_heads=2, num_layers=2, pooled_projection_dim=16, pos_embed_max_size=16, sample_size=8)),
    "flux": (FLUX, "black-forest-labs/FLUX.1-dev", 12.0, 512, dict(
        attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096, num_attention_heads=24,
        num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768, axes_dims_rope=[16, 56, 56]),
        dict(attention_head_dim=16, axes_dims_rope=[4, 6, 6], in_channels=16, joint_attention_dim=32,
             num_attention_heads=2, num_layers=1, num_single_layers=1, pooled_projection_dim=16)),
}
TINY_TOKENS, TINY_RESOLUTION = 8, 64
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class PeakMemory:
    """Peak memory of a phase over the baseline taken at construction, in GiB. CUDA: the allocator's peak. CPU
    (Linux): the kernel's exact RSS high-water mark, VmHWM, reset per phase through /proc/self/clear_refs."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda, self.torch = device == "cuda", torch
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM, reset per phase via clear_refs"
        self.baseline = self.peak(reset=True)

    def peak(self, reset: bool = False) -> int:
        """Bytes at the peak since the last reset (the current use right after one)."""
        if self.cuda:
            if reset:
                self.torch.cuda.reset_peak_memory_stats()
            return self.torch.cuda.max_memory_allocated()
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak RSS := current RSS (Linux >= 4.0)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    @contextmanager
    def phase(self, out: dict[str, float], key: str) -> Iterator[None]:
        self.peak(reset=True)
        try:
            yield
        finally:
            out[key] = (self.peak() - self.baseline) / GIB


def build(name: str, tiny: bool, dtype: Any, device: str) -> Any:
    """The denoiser from its published (or tiny) config, random weights, allocated directly in `dtype` on `device`."""
    import diffusers
    import torch

    cls, _, _, _, config, small = MODELS[name]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are allocated and initialised in `dtype`: no fp32 copy
    try:
        with torch.device(device):
            model = getattr(diffusers, cls)(**{**config, **small} if tiny else config)
    finally:
        torch.set_default_dtype(default)
    for module in model.modules():  # like torch_dtype=: float buffers too (SD3's pos_embed table is built in fp32)
        for key, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                module._buffers[key] = buf.to(dtype)
    return model


def inputs(name: str, model: Any, batch: int, resolution: int, tokens: int) -> dict[str, Any]:
    """Forward kwargs with the conditioning shapes the real pipeline feeds this denoiser."""
    import torch

    cfg, cls = model.config, MODELS[name][0]
    dev, dt = model.device, model.dtype
    side = resolution // 8  # VAE downsampling factor 8 for all four models

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dt)

    if cls == UNET:
        kw: dict[str, Any] = dict(sample=rand(batch, cfg.in_channels, side, side),
                                  timestep=torch.full((batch,), 500, device=dev),
                                  encoder_hidden_states=rand(batch, tokens, cfg.cross_attention_dim))
        if cfg.addition_embed_type == "text_time":  # SDXL: pooled text embedding + (orig, crop, target) sizes
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=dev, dtype=dt)
            kw["added_cond_kwargs"] = dict(text_embeds=rand(batch, pooled), time_ids=ids.repeat(batch, 1))
        return kw
    common = dict(encoder_hidden_states=rand(batch, tokens, cfg.joint_attention_dim),
                  pooled_projections=rand(batch, cfg.pooled_projection_dim))
    if cls == SD3:
        return dict(hidden_states=rand(batch, cfg.in_channels, side, side),
                    timestep=torch.full((batch,), 500.0, device=dev), **common)
    half = side // 2  # FLUX packs 2x2 latent patches (in_channels / 4 latent channels) into tokens
    img_ids = torch.zeros(half, half, 3, device=dev, dtype=dt)
    img_ids[..., 1] = torch.arange(half, device=dev)[:, None]
    img_ids[..., 2] = torch.arange(half, device=dev)[None, :]
    return dict(hidden_states=rand(batch, half * half, cfg.in_channels), timestep=torch.full((batch,), 0.5, device=dev),
                img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(tokens, 3, device=dev, dtype=dt),
                guidance=torch.full((batch,), 3.5, device=dev) if cfg.guidance_embeds else None, **common)


def timed(fn: Any, repeats: int, device: str) -> dict[str, list[float]]:
    """Wall and process-CPU seconds (all threads) of each of `repeats` calls; the first includes any warm-up."""
    import torch

    times: dict[str, list[float]] = {"wall": [], "cpu": []}
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times["wall"].append(time.perf_counter() - wall)
        times["cpu"].append(time.process_time() - cpu)
    return times


def fingerprint(params: list[Any], chunk: int = 1 << 22) -> list[int]:
    """An exact checksum of each tensor's bits, summed in chunks so no full-size temporary is made."""
    import torch

    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    sums = []
    for p in params:
        flat = p.detach().reshape(-1).view(ints[p.element_size()])
        sums.append(sum(int(flat[i:i + chunk].sum()) for i in range(0, flat.numel(), chunk)))
    return sums


def sampling(model: Any, name: str, shape: tuple[int, int], args: argparse.Namespace) -> dict[str, list[float]]:
    """Times of a no-grad batch-2 forward (cond + uncond, as with classifier-free guidance)."""
    import torch

    model.eval()
    cond = inputs(name, model, 2, *shape)
    with torch.no_grad():
        return timed(lambda: model(**cond), args.repeats, args.device)


def lora_setup(model: Any, name: str, shape: tuple[int, int], ckpt: bool) -> dict[str, Any]:
    """LoRA on the attention projections that exist, AdamW on it, a batch-1 input, and snapshots to compare."""
    import torch

    from peft import LoraConfig

    targets = UNET_TARGETS if MODELS[name][0] == UNET else TRANSFORMER_TARGETS  # peft skips absent ones
    model.requires_grad_(False)  # as the trainer does: frozen base, rank 4, gaussian A, zero B
    if ckpt:
        model.enable_gradient_checkpointing()
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    lora = [p for p in model.parameters() if p.requires_grad]
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    model.train()
    return dict(targets=targets, lora=lora, base=base, optimizer=torch.optim.AdamW(lora, lr=1e-4),
                batch=inputs(name, model, 1, *shape), lora_before=[p.detach().clone() for p in lora],
                base_before=fingerprint(base))


def training(model: Any, state: dict[str, Any], args: argparse.Namespace) -> dict[str, list[float]]:
    """Times of a LoRA training step: batch-1 forward, MSE loss, backward, AdamW step."""
    import torch

    def step() -> None:
        out = model(**state["batch"]).sample
        torch.nn.functional.mse_loss(out.float(), torch.randn_like(out, dtype=torch.float32)).backward()
        state["optimizer"].step()
        state["optimizer"].zero_grad(set_to_none=True)

    return timed(step, args.repeats, args.device)


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build one model, time a sampling step and a LoRA training step; the result row."""
    import diffusers
    import peft  # noqa: F401  (imported before the baseline, so no import counts towards a model's peak)
    import torch

    getattr(diffusers, MODELS[name][0])
    torch.set_num_threads(args.threads)
    cls, repo, published, tokens = MODELS[name][:4]
    shape = (TINY_RESOLUTION, TINY_TOKENS) if args.tiny else (args.resolution, tokens)
    ckpt = cls != UNET if args.gradient_checkpointing == "auto" else args.gradient_checkpointing == "on"
    mem: dict[str, float] = {}
    meter = PeakMemory(args.device)
    with meter.phase(mem, "build_peak_gib"):
        model = build(name, args.tiny, getattr(torch, DTYPES[args.dtype]), args.device)
    params = sum(p.numel() for p in model.parameters())
    stored = model.state_dict().values()  # parameters + persistent buffers, as in the published checkpoint
    with meter.phase(mem, "sample_peak_gib"):
        sample = sampling(model, name, shape, args)
    with meter.phase(mem, "lora_setup_peak_gib"):
        state = lora_setup(model, name, shape, ckpt)
    with meter.phase(mem, "train_peak_gib"):
        train = training(model, state, args)
    lora, base = state["lora"], state["base"]
    return dict(model=name, status="ok", repo=repo, cls=cls, tiny=args.tiny, device=args.device,
                threads=args.threads, dtype=str(model.dtype).removeprefix("torch."), resolution=shape[0],
                latent=[shape[0] // 8] * 2, text_tokens=shape[1], params=params,
                params_with_buffers=sum(t.numel() for t in stored), published_b=published,
                params_vs_published=sum(t.numel() for t in stored) / 1e9 / published,
                weights_gib=sum(t.numel() * t.element_size() for t in stored) / GIB,
                gradient_checkpointing=ckpt, lora_targets=state["targets"], lora_params=sum(p.numel() for p in lora),
                lora_dtype=str(lora[0].dtype).removeprefix("torch."),
                lora_changed=any(not torch.equal(a, p) for a, p in zip(state["lora_before"], lora)),
                base_unchanged=state["base_before"] == fingerprint(base) and all(p.grad is None for p in base),
                sample_step_s=min(sample["wall"]), sample_cpu_s=min(sample["cpu"]), sample_times_s=sample["wall"],
                train_step_s=min(train["wall"]), train_cpu_s=min(train["cpu"]), train_times_s=train["wall"],
                **mem, peak_gib=max(mem.values()), memory_method=meter.method)


def bench_or_oom(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """bench_model, or a row that says the model did not fit in memory."""
    import torch

    try:
        return bench_model(name, args)
    except (MemoryError, RuntimeError) as err:  # CUDA: torch.OutOfMemoryError; CPU: "DefaultCPUAllocator: ..."
        message = f"{type(err).__name__}: {err}"
        if not isinstance(err, (MemoryError, torch.OutOfMemoryError)) and "allocate" not in message \
                and "not enough memory" not in message:
            raise
        return dict(model=name, status="out of memory", reason=message.splitlines()[0][:300])


def skip_reason(name: str, args: argparse.Namespace) -> str | None:
    """Why a model is not run here (its weights alone would not fit), or None."""
    import psutil

    if args.tiny or args.device != "cpu":
        return None
    weights = MODELS[name][2] * 1e9 * {"fp32": 4}.get(args.dtype, 2) / GIB
    ram = psutil.virtual_memory()
    if name == "flux" and not args.include_flux:
        return (f"on CPU: {MODELS[name][2]:.0f}B parameters are {weights:.1f} GiB of {args.dtype} weights "
                f"before LoRA, activations and optimizer state; this machine has {ram.total / GIB:.1f} GiB of RAM "
                "(--include-flux tries anyway; run it on a GPU)")
    if weights > ram.available / GIB and name != "flux":
        return f"does not fit: {weights:.1f} GiB of weights, {ram.available / GIB:.1f} GiB of RAM available"
    return None


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one model in a fresh interpreter, so its peak memory is its own; a failed row if it dies."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--device", args.device,
           "--resolution", str(args.resolution), "--dtype", args.dtype, "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--gradient-checkpointing", args.gradient_checkpointing]
    cmd += ["--tiny"] if args.tiny else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    why = "killed by signal 9: most likely out of memory" if proc.returncode == -9 else proc.stderr.strip()[-2000:]
    return dict(model=name, status="failed", returncode=proc.returncode, reason=why)


def markdown(rows: list[dict[str, Any]]) -> str:
    """A table the README can paste."""
    lines = ["| model | params (published) | dtype | px | threads | grad ckpt | sampling step s (CPU s), batch 2 "
             "| LoRA train step s (CPU s), batch 1 | peak GiB: build / sample / train | LoRA params | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            why = (r["reason"] or "?").splitlines()[-1].replace("|", "/")
            lines.append(f"| {r['model']} | {r.get('published_b', MODELS[r['model']][2])}B | | | | | | | | | "
                         f"{r['status']}: {why} |")
            continue
        lines.append(f"| {r['model']} | {r['params_with_buffers'] / 1e9:.3f}B ({r['published_b']}B) | {r['dtype']} "
                     f"| {r['resolution']} | {r['threads'] if r['device'] == 'cpu' else '-'} "
                     f"| {'on' if r['gradient_checkpointing'] else 'off'} "
                     f"| {r['sample_step_s']:.2f} ({r['sample_cpu_s']:.1f}) | {r['train_step_s']:.2f} "
                     f"({r['train_cpu_s']:.1f}) | {r['build_peak_gib']:.2f} / "
                     f"{r['sample_peak_gib']:.2f} / {r['train_peak_gib']:.2f} | {r['lora_params'] / 1e6:.2f}M | ok |")
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        r = ok[0]
        loads = [x for r in ok for x in r.get("load_avg_1min_before_after", [])]
        where = (f"{r['device']}, {os.cpu_count()} cores shared with other jobs (1-min load average "
                 f"{min(loads):.1f}-{max(loads):.1f})" if r["device"] == "cpu" and loads else r["device"])
        calls = "/".join(sorted({str(len(r["train_times_s"])) for r in ok}))
        lines += ["", f"{where}; each time is the fastest of {calls} calls (all calls and the load "
                  "average are in the JSON), CPU s the process's CPU time in that call, all threads (other jobs on "
                  "the cores inflate both); peak memory over the process before the model was built (weights "
                  f"included), measured by {r['memory_method']}."]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--resolution", type=int, default=512, help="pixels (latents are resolution/8)")
    parser.add_argument("--models", default="sd15,sdxl,sd35m", help=f"comma-separated, of {','.join(MODELS)}")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per step; the fastest is reported")
    parser.add_argument("--gradient-checkpointing", default="auto", choices=["auto", "on", "off"],
                        help="auto: on for the transformers (SD3.5, FLUX), off for the UNets (the repo's default)")
    parser.add_argument("--include-flux", action="store_true", help="run FLUX on CPU too (needs > 24 GiB RAM)")
    parser.add_argument("--tiny", action="store_true", help="drastically reduced configs, 64 px, 8 text tokens")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per model (peaks then overlap)")
    parser.add_argument("--out", default="benchmarks/results/real_size_smoke.json", help="JSON; the table goes to .md")
    parser.add_argument("--merge", action="store_true", help="keep the other models' rows already in --out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")
    return args


def run_all(args: argparse.Namespace, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` (an earlier run's, with --merge) with a new row per model and thread count, in MODELS order."""
    names = args.models.split(",")
    rows = [r for r in rows if r["model"] not in names or r.get("threads") != args.threads]
    for name in names:
        reason = skip_reason(name, args)
        print(f"{name}: {reason or 'running ...'}", file=sys.stderr, flush=True)
        load = os.getloadavg()[0]
        if reason:
            row = dict(model=name, status="skipped", reason=reason)
        else:
            row = bench_or_oom(name, args) if args.in_process else run_child(name, args)
            row["load_avg_1min_before_after"] = [load, os.getloadavg()[0]]
        rows.append({**row, "threads": args.threads})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return sorted(rows, key=lambda r: (list(MODELS).index(r["model"]), r.get("threads", 0)))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from importlib.metadata import version

    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        print(json.dumps(bench_or_oom(args.child, args)))
        return []
    old: dict[str, Any] = {"commands": [], "rows": []}
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
    rows = run_all(args, old["rows"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    command = " ".join(["python", "benchmarks/real_size_smoke.py", *(sys.argv[1:] if argv is None else argv)])
    with open(args.out, "w") as f:
        json.dump(dict(commands=old.get("commands", [old.get("command")]) + [command], cpu_count=os.cpu_count(),
                       versions={p: version(p) for p in ("torch", "diffusers", "peft")}, rows=rows), f, indent=2)
    table = markdown(rows)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
