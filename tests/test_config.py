"""Config errors are caught before any model loads, and name the key and the valid choices."""

import pytest

from ddpo.config import ConfigError, list_presets, load_config, parse_overrides


def test_defaults_presets_and_overrides():
    config = load_config("tiny_cpu", ["train.learning_rate=1e-4", "seed=3", "model.lora_target_modules=[to_q,to_v]"])
    assert config.train.learning_rate == 1e-4 and config.seed == 3
    assert config.model.lora_target_modules == ["to_q", "to_v"]
    assert config.model.pretrained == "tiny-random"  # from the preset
    assert "tiny_cpu" in list_presets()


def test_every_preset_loads_and_validates():
    for name in list_presets():
        load_config(name)


def test_reward_kwargs_overrides_merge_into_the_presets_unless_the_reward_changes():
    config = load_config("shapes_alignment", ["reward.kwargs.expected=false", "reward.kwargs.num_captions=4",
                                              "reward.kwargs.captioner_kwargs.do_sample=true"])
    assert config.reward.kwargs == {"captioner": "shapes", "metric": "recall", "expected": False, "num_captions": 4,
                                    "captioner_kwargs": {"do_sample": True}}
    assert load_config("shapes_alignment", ["reward.name=jpeg_compressibility"]).reward.kwargs == {}
    other = load_config("shapes_alignment", ["reward.name=aesthetic", "reward.kwargs.model=/local/laion"])
    assert other.reward.kwargs == {"model": "/local/laion"}
    assert load_config("shapes_alignment", ["reward.name=vlm_bertscore"]).reward.kwargs["captioner"] == "shapes"
    as_mapping = load_config("shapes_alignment",
                             ["reward.kwargs={expected: false, num_captions: 4, captioner_kwargs: {do_sample: true}}"])
    assert as_mapping.reward.kwargs == config.reward.kwargs  # a mapping merges too
    assert load_config("shapes_alignment", ["sample={guidance_scale: 3}"]).sample.num_steps == 10  # the preset's
    with pytest.raises(ConfigError, match="override seed.x: seed is not a section"):
        load_config("shapes_alignment", ["seed.x=1"])


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config("tiny_cpu", ["train.learning_rate=1"]).train.learning_rate == 1.0
    with pytest.raises(ConfigError, match=r"train.num_epochs must be of type int, got 1.5"):
        load_config("tiny_cpu", ["train.num_epochs=1.5"])


@pytest.mark.parametrize("override,message", [
    (["train.lerning_rate=1"], r"unknown key train.'lerning_rate'; valid keys in train: algorithm,"),
    (["trian.x=1"], r"unknown key 'trian'"),
    (["train.algorithm=ppo"], r"train.algorithm='ppo' is not valid; choose one of: ddpo_is, ddpo_sf, rwr, rwr_sparse"),
    (["model.use_lora=maybe"], r"model.use_lora must be of type bool"),
    (["sample.eta=0"], r"needs a stochastic policy"),
    (["sample.batch_size=3", "sample.num_batches_per_epoch=1"], r"3 samples per process is not divisible by train.batch_size=2"),
    (["train.gradient_accumulation_steps=3"], r"not divisible by train.gradient_accumulation_steps=3"),
    (["train.timestep_fraction=0"], r"timestep_fraction"),
    (["train.algorithm=ddpo_sf", "train.num_inner_epochs=2"], r"on-policy"),
    (["sample.guidance_scale=0.5"], r"guidance_scale"),
    (["sample.images_per_prompt=3"], r"sample.batch_size=2 is not divisible by sample.images_per_prompt=3"),
    (["train.kl_coef=-1"], r"kl_coef=-1.0 must be >= 0"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_cpu", override)


def test_rwr_may_use_a_deterministic_sampler():
    assert load_config("tiny_cpu", ["sample.eta=0", "train.algorithm=rwr"]).sample.eta == 0


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["train.learning_rate"])
    with pytest.raises(ConfigError, match="no config file or preset named 'nope.yaml'; presets:"):
        load_config("nope.yaml")


def test_cli_reports_config_errors_without_a_traceback(capsys):
    from ddpo.cli import main

    assert main(["train", "tiny_cpu", "train.algorithm=ppo"]) == 2
    err = capsys.readouterr().err
    assert "choose one of: ddpo_is" in err and "Traceback" not in err
