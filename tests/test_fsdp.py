"""The denoiser sharded with FSDP2 (ddpo/sharding.py) over 2 CPU processes (gloo) trains as 1 unsharded process with
the same global batch, writes the unsharded checkpoint format (a LoRA file diffusers loads, a full transformer/
folder) and resumes exactly.

The processes get the environment that `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets, read
from that file by accelerate's own launcher code, and are started by torchrun (here `accelerate launch --cpu`
ignored --num_processes).
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddpo.checkpoint import LORA_FILE, list_checkpoints
from ddpo.metrics import read_metrics
from localhost import free_port

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["train.num_epochs=2", "sample.batch_size=2", "train.batch_size=2", "train.learning_rate=1e-2",
          "reward.name=rewards_for_tests:brightness", "prompts.eval_every=2", "prompts.eval_split=all",
          "prompts.eval_num_prompts=5"]  # evaluation: 3 images on one process, 2 on the other, 2 sampler batches each
# (sample.batch_size 2; the sharded forward is collective, so both processes must call it as often)


def fsdp_env() -> dict[str, str]:
    """What `accelerate launch --config_file configs/accelerate/fsdp.yaml` puts in the training processes' env."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "configs/accelerate/fsdp.yaml"),
                                               "-m", "ddpo.cli", "train"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}


def launch(nproc: int, *args, fsdp: bool = False, script: list[str] | None = None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(fsdp_env() if fsdp else {}),
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    program = script or ["-m", "ddpo.cli", "train"]
    torchrun = [shutil.which("torchrun") or "torchrun", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", *program]
    command = torchrun if nproc > 1 else [sys.executable, *program]
    return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=300)


def test_the_shipped_config_turns_on_fsdp2():
    env = fsdp_env()
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env  # each model's _no_split_modules: one config for every family


@pytest.fixture(scope="module", params=["tiny_cpu", "tiny_sd3"])  # the SD UNet, and an SD3 transformer
def runs(request, tmp_path_factory):
    """(folder, preset): `one` trained by 1 unsharded process on 2 batches of 2 accumulated into one step, `two` by
    2 sharded processes on 1 batch of 2 each."""
    preset, tmp = request.param, tmp_path_factory.mktemp(request.param)
    one = launch(1, preset, *COMMON, "sample.num_batches_per_epoch=2", "train.gradient_accumulation_steps=2",
                 f"logging.output_dir={tmp}", "logging.run_name=one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(2, preset, *COMMON, "sample.num_batches_per_epoch=1", "train.gradient_accumulation_steps=1",
                 f"logging.output_dir={tmp}", "logging.run_name=two", fsdp=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "FSDP: " in two.stdout and "sharded over 2 processes" in two.stdout
    return tmp, preset


def lora(run_dir: Path, index: int = -1) -> dict[str, torch.Tensor]:
    return load_file(list_checkpoints(run_dir)[index] / LORA_FILE)


@pytest.mark.slow
def test_two_sharded_processes_train_as_one_unsharded_process(runs):
    tmp, _ = runs
    rows_one, rows_two = read_metrics(tmp / "one" / "metrics.jsonl"), read_metrics(tmp / "two" / "metrics.jsonl")
    assert [r["num_samples"] for r in rows_two] == [4, 4]
    assert [r["reward_mean"] for r in rows_two] == pytest.approx([r["reward_mean"] for r in rows_one], rel=1e-6)
    assert rows_two[1]["eval_reward_mean"] == pytest.approx(rows_one[1]["eval_reward_mean"], rel=1e-5)
    final_one, final_two, initial = lora(tmp / "one"), lora(tmp / "two"), lora(tmp / "one", 0)
    assert any(not torch.equal(final_one[k], initial[k]) for k in initial)
    # Adam amplifies float noise in near-zero gradients: DDP differs from 1 process as much, and by how much
    # depends on the CPU's kernels (7.4e-5 on one element on an AMD EPYC). A step moves ~1e-2; the moments,
    # compared tightly below, are what pin the gradients.
    for key in final_one:
        torch.testing.assert_close(final_two[key], final_one[key], rtol=1e-5, atol=2e-4)
    # The optimizer state is gathered into the unsharded format: same ids, groups and (nearly) the same moments.
    opt_one, opt_two = (torch.load(list_checkpoints(tmp / r)[-1] / "optimizer.pt") for r in ("one", "two"))
    assert opt_one["param_groups"] == opt_two["param_groups"] and opt_one["state"].keys() == opt_two["state"].keys()
    for i, state in opt_one["state"].items():
        for name, value in state.items():
            assert type(opt_two["state"][i][name]) is torch.Tensor  # a plain tensor, not a DTensor
            torch.testing.assert_close(opt_two["state"][i][name], value, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_the_sharded_lora_file_loads_in_diffusers_like_the_unsharded_one(runs):
    from ddpo.config import load_config
    from ddpo.generate import generate_images, load_for_inference

    tmp, preset = runs
    assert sorted(lora(tmp / "two")) == sorted(lora(tmp / "one"))
    assert all(v.dtype == torch.float32 for v in lora(tmp / "two").values())
    config = load_config(preset)
    kwargs = {"num_steps": 3, "guidance_scale": config.sample.guidance_scale}
    images = {}
    for name in ("one", "two"):
        family = load_for_inference(config.model.pretrained, str(tmp / name))  # pipe.load_lora_weights(folder)
        assert family.denoiser.peft_config
        images[name] = generate_images(family, ["a cat"], **kwargs)
    torch.testing.assert_close(images["two"], images["one"], rtol=0, atol=1e-3)


@pytest.mark.slow
def test_a_sharded_run_resumed_after_an_epoch_ends_as_the_uninterrupted_run(runs):
    tmp, preset = runs
    if preset != "tiny_sd3":
        pytest.skip("one family is enough: the resume path does not depend on it")
    resumed = tmp / "resumed"
    shutil.copytree(tmp / "two", resumed)
    shutil.rmtree(list_checkpoints(resumed)[-1])  # as if stopped after epoch 1 was saved
    result = launch(2, "--resume", str(resumed), fsdp=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list_checkpoints(resumed)[-1].name == "epoch_0002"
    final, straight = lora(resumed), lora(tmp / "two")
    assert all(torch.equal(final[k], straight[k]) for k in straight)
    rows, straight_rows = read_metrics(resumed / "metrics.jsonl"), read_metrics(tmp / "two" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("reward_mean", "loss", "grad_norm", "eval_reward_mean"):
        assert [r.get(key) for r in rows] == [r.get(key) for r in straight_rows], key


SHARDED_STATE = textwrap.dedent('''
    """2 processes: full finetuning's save and load, the optimizer state round trip and the NaN check, sharded."""
    import os, sys
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from ddpo import sharding
    from ddpo.families import load_family
    from ddpo.pipeline import load_trained_weights, prepare_denoiser, save_trained_weights

    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    family = load_family("tiny-random-sd3")
    model = family.denoiser
    prepare_denoiser(model, use_lora=False, rank=2, alpha=2, target_modules=[], gradient_checkpointing=False,
                     attention="sdpa")
    if rank == 0:
        save_trained_weights(family, model, out / "unsharded", use_lora=False)
    params = sharding.shard_denoiser(model, torch.device("cpu"), "no", use_lora=False)
    assert sharding.is_sharded(model) and all(sharding.is_dtensor(p) for p in params)
    assert sum(p.to_local().numel() for p in params) < sum(p.numel() for p in params)  # each holds a part

    # Full finetuning: the gathered save is the unsharded save (weights, and config.json with the model's class).
    gathered, _ = sharding.gather_checkpoint(model, torch.optim.AdamW(params), use_lora=False, keep=rank == 0)
    if rank == 0:
        save_trained_weights(family, model, out / "sharded", use_lora=False, gathered=gathered)
    dist.barrier()
    for p in params:  # loading puts every process's rows back
        p.detach().zero_()
    load_trained_weights(family, model, out / "unsharded", use_lora=False)
    reloaded = sharding.gather_state_dict(model, trainable_only=False, keep=True)

    # The optimizer state: gathered into the unsharded format, then cut back into the same shards.
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    full = sharding.gather_optimizer_state(optimizer, keep=True)
    assert all(type(v) is torch.Tensor for s in full["state"].values() for v in s.values())
    again = torch.optim.AdamW(params, lr=1e-3)
    again.load_state_dict(sharding.shard_optimizer_state(again, full))
    same = all(torch.equal(sharding.local(again.state[p][k]), sharding.local(optimizer.state[p][k]))
               for p in params for k in ("exp_avg", "exp_avg_sq"))

    # A NaN in one process's rows is seen by both.
    with torch.no_grad():
        if rank == 1 and params[0].to_local().numel():
            params[0].to_local().view(-1)[-1] = float("nan")
    flags = sharding.nonfinite_flags(params)
    if rank == 0:
        torch.save({"reloaded": reloaded, "optimizer_same": same, "flags": flags}, out / "result.pt")
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skips tearing down gloo: destroy_process_group at exit aborted 1 run in ~10 here
''')


@pytest.mark.slow
def test_full_finetuning_state_optimizer_and_nan_check_under_sharding(tmp_path):
    script = tmp_path / "sharded_state.py"
    script.write_text(SHARDED_STATE)
    result = launch(2, str(tmp_path), script=[str(script)], fsdp=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("unsharded", "sharded"):  # a diffusers model folder
        assert (tmp_path / name / "transformer" / "config.json").is_file()
    from diffusers import SD3Transformer2DModel

    unsharded = SD3Transformer2DModel.from_pretrained(tmp_path / "unsharded" / "transformer").state_dict()
    sharded = SD3Transformer2DModel.from_pretrained(tmp_path / "sharded" / "transformer").state_dict()
    config = lambda name: (tmp_path / name / "transformer" / "config.json").read_text()  # noqa: E731
    assert config("sharded") == config("unsharded") and '"_class_name": "SD3Transformer2DModel"' in config("sharded")
    assert sharded.keys() == unsharded.keys() and all(torch.equal(sharded[k], unsharded[k]) for k in unsharded)
    out = torch.load(tmp_path / "result.pt")
    assert all(torch.equal(out["reloaded"][k], unsharded[k]) for k in unsharded)
    assert out["optimizer_same"]
    assert out["flags"][0] and not any(out["flags"][1:])


@pytest.mark.slow
def test_nft_old_policy_pass_under_sharding_equals_unsharded(tmp_path):
    # 2 optimizer steps per epoch: the second step's old-policy pass copies the epoch's starting weights into the
    # sharded parameters (a `.data` swap would go unseen by FSDP's gathers).
    nft = ["train.algorithm=nft", "train.num_inner_epochs=2", "prompts.eval_every=0"]
    one = launch(1, "tiny_sd3", *COMMON, *nft, "sample.num_batches_per_epoch=2", "train.gradient_accumulation_steps=2",
                 f"logging.output_dir={tmp_path}", "logging.run_name=one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(2, "tiny_sd3", *COMMON, *nft, "sample.num_batches_per_epoch=1", "train.gradient_accumulation_steps=1",
                 f"logging.output_dir={tmp_path}", "logging.run_name=two", fsdp=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert [r["optimizer_steps"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")] == [2, 2]
    final_one, final_two = lora(tmp_path / "one"), lora(tmp_path / "two")
    for key in final_one:
        torch.testing.assert_close(final_two[key], final_one[key], rtol=1e-5, atol=1e-5)
