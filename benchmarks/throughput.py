"""DDPO epoch time against its compute floor, on a CPU-sized Stable Diffusion.

For sampling and for training, prints the wall time the trainer took beside the time the same UNet calls
take in a tight loop (the floor: no prompt sampling, no scheduler, no rewards, no bookkeeping), and peak
memory. Target: epoch time within 1.15x of the floor.

    python benchmarks/throughput.py                 # 1 and 2 torch threads, each in a fresh process
    python benchmarks/throughput.py --threads 1     # one setting, in this process
    python benchmarks/throughput.py --timesteps-per-call 10   # all 10 trained steps of a micro-batch per UNet call
    python benchmarks/throughput.py --channels-last         # model.channels_last=true (UNet weights in NHWC)
    python benchmarks/throughput.py --device cuda --compile # model.compile=true (inductor; refused off CUDA)
    python benchmarks/throughput.py --device cuda --plain-copies   # without pinned, non-blocking host->device copies

Each option is one side of a comparison: time the baseline (the same command without it) in alternation with it,
e.g. `for i in 1 2 3; do python benchmarks/throughput.py --threads 1; python benchmarks/throughput.py --threads 1
--channels-last; done`. With --compile, epoch 1 (excluded, as always) and the floor's warm-up loop compile.

The rewards run in a worker process (`reward.executor=process`, the default); the last row runs them on a
thread of the training process instead, to show the slowdown that a torch op on a second thread causes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

BENCH = dict(channels=(32, 64), cross_attention_dim=32, sample_size=16)  # ~0.9M-parameter UNet, 16x16 latents
OVERRIDES = ["sample.num_steps=10", "sample.batch_size=4", "sample.num_batches_per_epoch=2", "train.batch_size=4",
             "train.num_epochs=5", "reward.name=jpeg_compressibility",
             "logging.sample_grid=false", "logging.keep_last=1"]


def build_model(folder: str) -> str:
    from ddpo.tiny import build_tiny_pipeline

    build_tiny_pipeline(seed=0, **BENCH).save_pretrained(folder)
    return folder


def unet_floor(model: str, config, device: str = "cpu") -> tuple[float, float]:
    """Seconds per epoch of the bare UNet calls: (sampling forwards, training forward+backward)."""
    import torch

    from ddpo.trainer import build_policy

    family, params = build_policy(config, torch.device(device))  # with the run's model.compile / channels_last
    s, t = config.sample, config.train
    unet = family.denoiser
    latents = torch.randn(2 * s.batch_size, 4, BENCH["sample_size"], BENCH["sample_size"], device=device)
    embeds = torch.randn(2 * s.batch_size, 77, BENCH["cross_attention_dim"], device=device)
    timesteps = torch.full((2 * s.batch_size,), 500, device=device)
    micro = 2 * t.batch_size

    def sample_loop() -> None:
        with torch.no_grad():
            for _ in range(s.num_batches_per_epoch * s.num_steps):
                unet(latents, timesteps, encoder_hidden_states=embeds)

    def train_loop() -> None:
        for _ in range(s.batch_size * s.num_batches_per_epoch // t.batch_size * s.num_steps):
            unet(latents[:micro], timesteps[:micro], encoder_hidden_states=embeds[:micro]).sample.mean().backward()

    return best_of(sample_loop, device), best_of(train_loop, device)


def best_of(loop, device: str = "cpu", repeats: int = 4) -> float:
    """The fastest of `repeats` timed runs after one warm-up: the floor, robust to other jobs on the machine."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # time the GPU's work, not its queueing
    loop()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        loop()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def plain_copies() -> None:
    """Host->device copies as before ddpo/transfer.py (`tensor.to(device)`, pageable and blocking): the baseline of
    the pinned copies. Each module that imported `to_device` gets the plain one."""
    from ddpo import logprob, objectives, sampler
    from ddpo.families import flow, sd

    for module in (logprob, objectives, sampler, flow, sd):
        module.to_device = lambda tensor, device: tensor.to(device)


def run(threads: int, executor: str, timesteps_per_call: int = 1, device: str = "cpu",
        options: tuple[str, ...] = ()) -> dict:
    import torch

    torch.set_num_threads(threads)
    from ddpo.config import load_config
    from ddpo.metrics import read_metrics
    from ddpo.trainer import train

    if "plain_copies" in options:
        plain_copies()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(os.path.join(tmp, "model"))
        config = load_config("tiny_cpu", [f"model.pretrained={model}", f"logging.output_dir={tmp}",
                                          "logging.run_name=bench", f"reward.executor={executor}", *OVERRIDES,
                                          f"train.timesteps_per_call={timesteps_per_call}",
                                          *(f"model.{key}=true" for key in ("compile", "channels_last")
                                            if key in options)])
        # The floor first: once a torch op has run on a second thread (executor=thread), later ops are slower.
        sample_floor, train_floor = unet_floor(model, config, device)
        run_dir = train(config)
        rows = read_metrics(run_dir / "metrics.jsonl")[1:]  # epoch 0 warms up (and starts the reward worker)
    best = min(rows, key=lambda r: r["epoch_s"])  # like the floor: the fastest epoch, robust to other jobs
    return {"threads": threads, "executor": executor, "device": device, "options": list(options), "sample_s": best["sample_s"], "sample_floor_s": sample_floor,
            "reward_wait_s": best["reward_s"], "train_s": best["train_s"], "train_floor_s": train_floor,
            "epoch_s": best["epoch_s"], "epoch_over_floor": best["epoch_s"] / (sample_floor + train_floor),
            "samples_per_s": best["samples_per_s"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: 1 and 2, each in a fresh process)")
    parser.add_argument("--executor", default="process", choices=["process", "thread", "inline"])
    parser.add_argument("--timesteps-per-call", type=int, default=1, help="train.timesteps_per_call (default 1)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: any GPU hidden (CUDA_VISIBLE_DEVICES empty); cuda: the run and the floor on the GPU")
    parser.add_argument("--compile", action="store_true", help="model.compile=true (CUDA only)")
    parser.add_argument("--channels-last", action="store_true", help="model.channels_last=true")
    parser.add_argument("--plain-copies", action="store_true",
                        help="pageable, blocking host->device copies instead of pinned ones (the baseline on CUDA)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
    options = tuple(key for key in ("compile", "channels_last", "plain_copies") if getattr(args, key))
    flags = [f"--{key.replace('_', '-')}" for key in options]
    if args.threads:
        print(json.dumps(run(args.threads, args.executor, args.timesteps_per_call, args.device, options)))
        return
    results = []
    for threads, executor in ((1, "process"), (2, "process"), (2, "thread")):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--executor", executor,
                              "--timesteps-per-call", str(args.timesteps_per_call), "--device", args.device,
                              *flags], env=env, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print("| threads | rewards on | sample s (floor) | reward wait s | train s (floor) | epoch s | epoch / floor "
          "| samples/s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['threads']} | {r['executor']} | {r['sample_s']:.2f} ({r['sample_floor_s']:.2f}) | {r['reward_wait_s']:.2f} | "
              f"{r['train_s']:.2f} ({r['train_floor_s']:.2f}) | {r['epoch_s']:.2f} | {r['epoch_over_floor']:.2f}x | "
              f"{r['samples_per_s']:.1f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
