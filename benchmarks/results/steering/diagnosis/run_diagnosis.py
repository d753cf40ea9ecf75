"""The one-variable-at-a-time DSRL-NA runs on FetchPush-v4 behind docs/steering.md ("Why DSRL degraded").

    python benchmarks/results/steering/diagnosis/run_diagnosis.py NAME STEPS [key=value ...]

Keys of TrainConfig (gamma, init_alpha, reward_shift, regularizer, backup_entropy, noise_bound, seed) set
the run's options; other keys (e.g. normalize_obs=false) override DSRLNAConfig. Values are JSON
('regularizer="base_kl"'). Seed 0, evaluation every 2500 steps on 20 fixed seeds, no video; the run goes to
runs/steer_diag/NAME. The metrics' "train" entry holds the diagnostics (TD-target mean, alpha, log pi,
saturation, training-episode success).

The runs measured (all seed 0, 20 000 steps unless stopped early): the defaults before the fix were
gamma=0.9975 (0.99 per chunk) init_alpha=1 regularizer="entropy" reward_shift=0 normalize_obs=false.
"""

import functools
import json
import sys

import torch

import ddpo.steering.train_na as train_na
from ddpo.steering.dsrl_na import DSRLNAConfig
from ddpo.steering.train import TrainConfig, train


def main(argv: list[str]) -> None:
    name, steps, *pairs = argv
    overrides = {key: json.loads(value) for key, value in (pair.split("=", 1) for pair in pairs)}
    run_options = {key: overrides.pop(key) for key in list(overrides) if key in TrainConfig.__dataclass_fields__}
    train_na.DSRLNAConfig = functools.partial(DSRLNAConfig, **overrides)  # what TrainConfig does not expose
    config = TrainConfig(env_id="FetchPush-v4", method="dsrl_na", steps=int(steps), eval_every=2500, eval_episodes=20,
                         checkpoint_every=5000, video=False, **run_options)
    train(config, f"runs/steer_diag/{name}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
