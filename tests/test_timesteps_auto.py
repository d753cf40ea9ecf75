"""train.timesteps_per_call=auto: as many timesteps per call as fit train.activation_memory_gib (ddpo/memory.py)."""

import json
import logging

import pytest
import torch

from ddpo import memory
from ddpo.config import Config, ConfigError, config_from_file, load_config, save_config

from tiny_rollout import STEPS, tiny_rollout  # STEPS: tiny_cpu's sample.num_steps, all trained


class _RecordingOptimizer:
    """Stands in for AdamW: records the accumulated LoRA gradients of each optimizer step."""

    def __init__(self, params):
        self.params, self.steps, self.state = params, [], {}

    def step(self):
        self.steps.append([p.grad.detach().clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


class _TwoProcesses:
    """A CPU accelerator whose `gather` adds another process's choice: `other` timesteps per call."""

    def __init__(self, other: int):
        from accelerate import Accelerator

        self.inner, self.other = Accelerator(cpu=True), other

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def gather(self, tensor):
        return torch.cat([tensor, torch.tensor([self.other], dtype=tensor.dtype)])


@pytest.fixture(scope="module")
def setup():
    """A tiny LoRA policy, perturbed after sampling (ratios != 1), and its rollout of 4 samples."""
    return tiny_rollout(double=False)


def _update(setup, *overrides, accelerator=None):
    """(gradients of every optimizer step, returned statistics) of one policy_update with these overrides."""
    from accelerate import Accelerator

    from ddpo.update import policy_update

    family, params, rollout, weights = setup
    config = load_config("tiny_cpu", ["train.max_grad_norm=1e12", "train.clip_range=3e-3", *overrides])
    optimizer = _RecordingOptimizer(params)
    family.pipe.unet.train()
    stats = policy_update(family.pipe.unet, family, optimizer, accelerator or Accelerator(cpu=True), params, rollout,
                          weights, config, epoch=0, progress=False)
    return optimizer.steps, stats


@pytest.fixture(autouse=True)
def _fresh_choices():
    """Each test measures afresh: the cache of choices is per model, and the fixture's model is shared."""
    memory._CHOSEN.clear()
    memory._PINNED.clear()
    yield
    memory._CHOSEN.clear()
    memory._PINNED.clear()


def _per_step(setup) -> int:
    """The bytes one more timestep per call saves, as auto measures them for the fixture's micro-batch of 2."""
    from ddpo.objectives import ddpo_chunk_loss

    family, _, rollout, weights = setup
    config = load_config("tiny_cpu")
    idx = torch.arange(config.train.batch_size)
    family.pipe.unet.train()
    return memory.per_step_bytes(lambda k: ddpo_chunk_loss(family.pipe.unet, family, rollout, idx,
                                                           torch.arange(k).expand(len(idx), k), weights, config))


# ---------------------------------------------------------------------------------------------- the measure


def test_saved_bytes_counts_each_saved_storage_once():
    x = torch.randn(1000, requires_grad=True)  # 4000 bytes
    assert memory.saved_bytes(lambda: x.exp().sum()) == 4000  # exp saves its result
    assert memory.saved_bytes(lambda: (x * x).sum()) == 4000  # x saved twice, one storage
    assert memory.saved_bytes(lambda: (x * x.exp()).sum()) == 8000  # x, and exp(x) (saved by exp and mul)
    assert memory.saved_bytes(lambda: (x[:10] * 2.0).sum()) == 0  # a scalar factor: nothing to save
    assert memory.saved_bytes(lambda: (x[:10] * x[10:20]).sum()) == 4000  # views keep the whole storage alive
    with torch.no_grad():
        assert memory.saved_bytes(lambda: (x * x).sum()) == 0


def test_the_probe_leaves_no_graph_to_backpropagate():
    x = torch.randn(10, requires_grad=True)
    kept = []
    memory.saved_bytes(lambda: kept.append((x * x).sum()))
    with pytest.raises(RuntimeError, match="cannot be backpropagated"):
        kept[0].backward()


def test_one_step_per_call_grows_linearly_with_the_micro_batch(setup):
    per_step = _per_step(setup)
    assert per_step > 100_000  # a UNet's activations for 2 samples x 2 (CFG): hundreds of KiB, not nothing
    config = load_config("tiny_cpu", ["train.batch_size=4", "sample.batch_size=4", "sample.num_batches_per_epoch=1"])
    from ddpo.objectives import ddpo_chunk_loss

    family, _, rollout, weights = setup
    idx = torch.arange(4)
    four = memory.per_step_bytes(lambda k: ddpo_chunk_loss(family.pipe.unet, family, rollout, idx,
                                                           torch.arange(k).expand(4, k), weights, config))
    assert four == pytest.approx(2 * per_step, rel=0.1)


@pytest.mark.parametrize("budget,per_step,steps,expected", [(10, 3, 8, 3), (1, 3, 8, 1), (0, 3, 8, 1),
                                                            (1000, 3, 8, 8), (9, 3, 3, 3), (5, 0, 6, 6)])
def test_choose_timesteps_clamps_the_budget_s_share_to_one_to_all_steps(budget, per_step, steps, expected):
    assert memory.choose_timesteps(budget, per_step, steps) == expected


def test_the_budget_is_a_share_of_free_memory_or_the_configured_gib(monkeypatch):
    cpu = torch.device("cpu")
    assert memory.budget_bytes(1.5, cpu, [], False)[0] == 1.5 * 2**30
    auto, how = memory.budget_bytes("auto", cpu, [], False)
    assert 0 < auto <= memory.CPU_CAP_GIB * 2**30 and "available RAM" in how
    monkeypatch.setattr(memory, "_available_ram", lambda: 2 * 2**30)  # 2 GiB available: a quarter of it
    assert memory.budget_bytes("auto", cpu, [], False)[0] == 0.5 * 2**30
    monkeypatch.setattr(memory, "_available_ram", lambda: 1000 * 2**30)
    assert memory.budget_bytes("auto", cpu, [], False)[0] == memory.CPU_CAP_GIB * 2**30


def test_on_cuda_the_budget_is_half_the_free_memory_after_the_first_step_s_gradients_and_moments(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 3 * gib)  # 2 GiB cached, free to reuse
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1 * gib)
    params = [torch.zeros(1).expand(gib // 4)]  # 1 GiB of fp32 parameters (a view: no memory here)
    cuda = torch.device("cuda", 0)
    # Before the first step: 10 + 2 GiB less 1 GiB of gradients and 2 GiB of AdamW moments, halved.
    assert memory.budget_bytes("auto", cuda, params, optimizer_has_state=False)[0] == 4.5 * gib
    assert memory.budget_bytes("auto", cuda, params, optimizer_has_state=True)[0] == 6 * gib
    assert memory.budget_bytes(2, cuda, params, optimizer_has_state=False)[0] == 2 * gib  # as configured


def test_available_ram_without_psutil_reads_proc_meminfo(monkeypatch):
    import sys

    with_psutil = memory._available_ram()
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError
    without = memory._available_ram()
    assert without > 0 and abs(without - with_psutil) < 2**30  # the same quantity, a moment later


# ---------------------------------------------------------------------------------------------- the update


def test_tiny_and_huge_budgets_give_one_and_all_steps(setup):
    assert _update(setup, "train.activation_memory_gib=1e-9")[1]["timesteps_per_call"] == 1
    assert _update(setup, "train.activation_memory_gib=1000")[1]["timesteps_per_call"] == STEPS
    assert 1 <= _update(setup)[1]["timesteps_per_call"] <= STEPS  # the default budget


@pytest.mark.parametrize("share,expected", [(1.5, 1), (2.5, 2), (3.2, 3)])
def test_the_choice_is_the_budget_over_the_measured_step(setup, share, expected):
    gib = share * _per_step(setup) / 2**30
    assert _update(setup, f"train.activation_memory_gib={gib!r}")[1]["timesteps_per_call"] == expected


def _assert_equal(a, b):
    (grads_a, stats_a), (grads_b, stats_b) = a, b
    assert len(grads_a) == len(grads_b) > 0
    for step_a, step_b in zip(grads_a, grads_b):
        assert max(float(g.abs().max()) for g in step_a) > 0  # something was trained
        for ga, gb in zip(step_a, step_b):
            assert torch.equal(ga, gb)
    assert stats_a == stats_b


@pytest.mark.parametrize("share", [1.5, 2.5, 1e6])  # auto chooses 1, 2, 4
def test_the_probe_does_not_change_the_update(setup, share, monkeypatch):
    """auto trains exactly as the number it chose, even where the denoiser draws random numbers (dropout)."""
    family = setup[0]
    real = family.predict

    def noisy(*args):  # as a denoiser with dropout: the output depends on the global generator
        out = real(*args)
        return out + 1e-3 * torch.randn(out.shape)

    monkeypatch.setattr(family, "predict", noisy)
    gib = share * _per_step(setup) / 2**30
    torch.manual_seed(7)
    auto = _update(setup, "train.timesteps_per_call=auto", f"train.activation_memory_gib={gib!r}")
    after_auto = torch.get_rng_state()
    chosen = auto[1]["timesteps_per_call"]
    torch.manual_seed(7)
    explicit = _update(setup, f"train.timesteps_per_call={chosen}")
    assert torch.equal(after_auto, torch.get_rng_state())  # the probe drew nothing from training's generator
    assert chosen == {1.5: 1, 2.5: 2, 1e6: STEPS}[share]
    _assert_equal(auto, explicit)
    torch.manual_seed(8)
    assert not torch.equal(_update(setup, f"train.timesteps_per_call={chosen}")[0][0][0], explicit[0][0][0])


def test_the_probe_leaves_no_gradient_and_is_measured_once(setup, monkeypatch):
    from accelerate import Accelerator

    from ddpo.update import _timesteps_per_call, _trainable_steps

    family, params, rollout, weights = setup
    config = load_config("tiny_cpu")
    calls = []
    real = memory.per_step_bytes
    monkeypatch.setattr(memory, "per_step_bytes", lambda fn: calls.append(1) or real(fn))
    trainable = _trainable_steps(family, rollout, config)
    for _ in range(2):
        assert 1 <= _timesteps_per_call(family.pipe.unet, family, _RecordingOptimizer(params), Accelerator(cpu=True),
                                        params, rollout, weights, config, trainable, STEPS) <= STEPS
    assert len(calls) == 1 and all(p.grad is None for p in params)
    _update(setup, "train.activation_memory_gib=1000")  # other settings: measured again
    assert len(calls) == 2


def test_every_process_takes_the_smallest_choice(setup):
    assert _update(setup, "train.activation_memory_gib=1000", accelerator=_TwoProcesses(other=2))[1][
        "timesteps_per_call"] == 2


def test_explicit_values_and_forward_noising_losses_measure_nothing(setup, monkeypatch):
    monkeypatch.setattr(memory, "per_step_bytes", lambda fn: pytest.fail("measured"))
    assert _update(setup, "train.timesteps_per_call=3")[1]["timesteps_per_call"] == 3
    assert _update(setup, "train.timesteps_per_call=9")[1]["timesteps_per_call"] == STEPS  # at most the steps
    assert _update(setup, "train.algorithm=rwr")[1]["timesteps_per_call"] == 1  # one random time per sample
    assert _update(setup, "train.timestep_fraction=0.25")[1]["timesteps_per_call"] == 1  # one step trained


# ---------------------------------------------------------------------------------------------- config


def test_auto_is_the_default_and_reads_from_yaml_and_overrides(tmp_path):
    assert (Config().train.timesteps_per_call, Config().train.activation_memory_gib) == ("auto", "auto")
    assert load_config("sd15_aesthetic").train.timesteps_per_call == "auto"
    assert load_config("shapes_alignment").train.timesteps_per_call == 1  # its documented numbers
    config = load_config("tiny_cpu", ["train.timesteps_per_call=3", "train.activation_memory_gib=2"])
    assert (config.train.timesteps_per_call, config.train.activation_memory_gib) == (3, 2.0)
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  timesteps_per_call: auto\n  activation_memory_gib: 0.5\n")
    config = load_config(str(path))
    assert (config.train.timesteps_per_call, config.train.activation_memory_gib) == ("auto", 0.5)
    save_config(config, tmp_path / "saved.yaml")  # a run's config.yaml and a checkpoint's read back alike
    assert config_from_file(tmp_path / "saved.yaml").train.timesteps_per_call == "auto"


@pytest.mark.parametrize("override,message", [
    ("train.timesteps_per_call=0", r"train.timesteps_per_call=0 must be >= 1 \(1 = one UNet call per step\) or auto"),
    ("train.timesteps_per_call=-2", r"train.timesteps_per_call=-2 must be >= 1"),
    ("train.timesteps_per_call=Auto", r"train.timesteps_per_call='Auto' is not valid; give an int or 'auto'"),
    ("train.timesteps_per_call=2.5", r"train.timesteps_per_call=2.5 is not valid; give an int or 'auto'"),
    ("train.timesteps_per_call=true", r"train.timesteps_per_call=True is not valid"),
    ("train.activation_memory_gib=0", r"train.activation_memory_gib=0.0 must be > 0 .* or auto"),
    ("train.activation_memory_gib=-1", r"train.activation_memory_gib=-1.0 must be > 0"),
    ("train.activation_memory_gib=lots", r"train.activation_memory_gib='lots' is not valid; give a float or 'auto'"),
    ("train.activation_memory_gib=.inf", r"train.activation_memory_gib=inf must be a finite number"),
])
def test_bad_values_are_refused_before_any_model_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_cpu", [override])


def test_the_cli_refuses_a_bad_value_with_one_line(tmp_path, capsys):
    from ddpo.cli import main

    assert main(["train", "tiny_cpu", f"logging.output_dir={tmp_path}", "train.timesteps_per_call=many"]) == 2
    err = capsys.readouterr().err
    assert "train.timesteps_per_call='many' is not valid; give an int or 'auto'" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # refused before a run folder (or a model) existed


# ---------------------------------------------------------------------------------------------- a run


def test_a_run_with_auto_logs_and_records_its_choice(tmp_path, caplog):
    from ddpo.metrics import read_metrics
    from ddpo.trainer import train

    with caplog.at_level(logging.INFO, logger="ddpo"):
        run = train(load_config("tiny_cpu", [f"logging.output_dir={tmp_path}", "logging.run_name=auto",
                                             "train.num_epochs=2", "logging.sample_grid=false"]))
    rows = read_metrics(run / "metrics.jsonl")
    assert [row["timesteps_per_call"] for row in rows] == [STEPS, STEPS]  # tiny activations: all steps
    chosen = [r.getMessage() for r in caplog.records if "train.timesteps_per_call=auto" in r.getMessage()]
    assert len(chosen) == 1 and f"{STEPS} of {STEPS} trained steps per call" in chosen[0]  # measured once
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["timesteps_per_call"] == STEPS


def test_a_resumed_run_takes_the_choice_its_checkpoint_recorded(tmp_path, monkeypatch):
    """Another free-memory figure at resume would choose another value (other float rounding): the checkpoint's
    choice wins, and the resumed epochs equal an uninterrupted run's."""
    from ddpo.checkpoint import read_trainer_state
    from ddpo.metrics import read_metrics
    from ddpo.trainer import train

    def run(name: str, epochs: int, resume=None):
        return train(load_config("tiny_cpu", [f"logging.output_dir={tmp_path}", f"logging.run_name={name}",
                                              f"train.num_epochs={epochs}", "logging.sample_grid=false",
                                              "logging.save_every=1"]), resume=resume)

    whole = run("whole", 2)
    first = run("part", 1)
    assert read_trainer_state(first / "checkpoints" / "epoch_0001")["timesteps_per_call"] == STEPS
    memory._CHOSEN.clear()
    monkeypatch.setattr(memory, "budget_bytes", lambda *a, **k: (1.0, "a tiny budget"))  # measuring would give 1
    resumed = run("part", 2, resume=str(first))
    rows, expected = read_metrics(resumed / "metrics.jsonl"), read_metrics(whole / "metrics.jsonl")
    assert [row["timesteps_per_call"] for row in rows] == [STEPS, STEPS]
    assert rows[1]["loss"] == expected[1]["loss"] and rows[1]["reward_mean"] == expected[1]["reward_mean"]
