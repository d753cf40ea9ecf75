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


def test_every_preset_has_a_one_line_description_that_list_presets_prints(capsys):
    from ddpo.config import preset_description
    from ddpo.train_cli import main

    assert main(["--list-presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_presets()
    for name, line in zip(list_presets(), lines):
        description = preset_description(name)
        assert 20 <= len(description) <= 120 and line.split(None, 1)[1].startswith(description), name
    assert [line for line in lines if line.endswith("(the default)")] == [line for line in lines
                                                                          if line.startswith("shapes_alignment ")]
    assert "8 GPUs" in preset_description("sd15_aesthetic") and "offline" in preset_description("shapes_alignment")


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
    (["train.lerning_rate=1"], r"unknown key train.lerning_rate \(did you mean train.learning_rate\?\); valid keys in "
                               r"train: algorithm,"),
    (["trian.x=1"], r"unknown key trian \(did you mean train\?\); valid keys in the top level"),
    (["train.zzz=1"], r"unknown key train.zzz; valid keys in train"),  # nothing close: no suggestion
    (["train.num epochs=1"], r"unknown key train.'num epochs' \(did you mean train.num_epochs\?\)"),
    (["train.algorithm=ppo"], r"train.algorithm='ppo' is not valid; choose one of: ddpo_is, ddpo_sf, grpo, rwr, rwr_sparse, nft"),
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


@pytest.mark.parametrize("override,message", [
    (["logging.run_name=../x"], r"logging.run_name='../x': use letters, digits"),
    (["logging.run_name=/tmp/x"], r"logging.run_name='/tmp/x': use letters"),
    (["logging.run_name=a/b"], r"logging.run_name='a/b'"),
    (["logging.run_name=.hidden"], r"starting with a letter or digit"),
    (['logging.run_name="x\\n"'], r"logging.run_name='x\\n'"),  # re's `$` would accept the newline
    (["seed=-1"], r"seed=-1 must be in \[0, 4294967295\]"),
    (["seed=4294967296"], r"seed=4294967296 must be in"),
    (["prompts.eval_seed=-3"], r"prompts.eval_seed=-3 must be in"),
    (["train.stat_buffer_size=2", "train.stat_min_count=4"],
     r"train.stat_buffer_size=2 is smaller than train.stat_min_count=4.*per_prompt_stat_tracking=false"),
    (["train.learning_rate=.inf"], r"train.learning_rate=inf must be a finite number"),
    (["train.learning_rate=1e999"], r"train.learning_rate=inf must be a finite number"),
    (["sample.eta=.nan"], r"sample.eta=nan must be a finite number"),
    (["train.max_grad_norm=-.inf"], r"train.max_grad_norm=-inf must be a finite number"),
    (["reward.kwargs.day=2024-01-01"], r"reward.kwargs.day=datetime.date\(2024, 1, 1\) is a date .*quote it"),
    (["reward.kwargs={a: {b: [1, 2024-01-01 10:00:00]}}"], r"reward.kwargs.a.b\[1\]=.* is a datetime"),
    (["reward.kwargs={1: 2}"], r"reward.kwargs has the key 1 \(int\); keys must be text"),
    (["seed=[1,"], r"override 'seed=\[1,': line 1, column 4: not valid YAML"),
])
def test_bad_input_values_are_refused_with_a_message(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_cpu", override)


def test_good_run_names_seeds_and_plain_kwargs_pass():
    config = load_config("tiny_cpu", ["logging.run_name=ok-1.2_x", "seed=4294967295", "train.stat_buffer_size=2",
                                      "train.stat_min_count=4", "train.per_prompt_stat_tracking=false",
                                      "reward.kwargs={a: [1, 2.5, x, null, true], b: {c: '2024-01-01'}}"])
    assert config.logging.run_name == "ok-1.2_x" and config.seed == 2**32 - 1
    assert config.reward.kwargs == {"a": [1, 2.5, "x", None, True], "b": {"c": "2024-01-01"}}


def test_yaml_booleans_are_read_back_as_the_words_a_choice_lists(tmp_path):
    path = tmp_path / "mp.yaml"
    path.write_text("model:\n  mixed_precision: no\n")  # YAML 1.1 reads `no` as False
    assert load_config(str(path)).model.mixed_precision == "no"
    assert load_config("tiny_cpu", ["model.mixed_precision=off"]).model.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"model.mixed_precision=True is not valid; choose one of: no, fp16, bf16"):
        load_config("tiny_cpu", ["model.mixed_precision=yes"])  # no "yes" among the choices


def test_malformed_binary_and_control_character_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\ntrain: {}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line 2, column 6: not valid YAML: expected ',' or ']'"):
        load_config(str(bad))
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=r"bin.yaml: cannot read the config file .*UTF-8 YAML text file"):
        load_config(str(binary))
    control = tmp_path / "ctl.yaml"
    control.write_bytes(b"seed: 1\n\x01\n")
    with pytest.raises(ConfigError, match=r"ctl.yaml: line 2, column 1: not YAML text \(character U\+0001\)"):
        load_config(str(control))


def test_cli_reports_malformed_yaml_without_a_traceback(tmp_path, capsys):
    from ddpo.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {learning_rate: 1e-4\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "line 2, column 1: not valid YAML" in err and "Traceback" not in err
