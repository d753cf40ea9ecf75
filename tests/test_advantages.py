import numpy as np
import pytest

from ddpo.advantages import PerPromptStatTracker, batch_advantages


def test_batch_advantages_are_standardised():
    adv = batch_advantages(np.array([1.0, 2.0, 3.0, 6.0]))
    assert adv.mean() == pytest.approx(0, abs=1e-6) and adv.std() == pytest.approx(1, abs=1e-4)


def test_uses_batch_statistics_until_min_count_then_per_prompt():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    # "a" has 2 rewards < min_count: normalised with the whole batch's mean 2.5 and std.
    adv = tracker.update(["a", "a", "b", "b"], np.array([1.0, 2.0, 3.0, 4.0]))
    batch = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(adv, (batch - batch.mean()) / (batch.std() + 1e-6), rtol=1e-5)
    # Now "a" has 4 rewards in its buffer (>= 3): its own statistics.
    adv = tracker.update(["a", "a", "b"], np.array([10.0, 20.0, 3.0]))
    buf = np.array([1.0, 2.0, 10.0, 20.0])
    np.testing.assert_allclose(adv[:2], (np.array([10.0, 20.0]) - buf.mean()) / (buf.std() + 1e-6), rtol=1e-5)


def test_buffer_keeps_only_the_last_rewards_and_round_trips():
    tracker = PerPromptStatTracker(buffer_size=2, min_count=1)
    tracker.update(["a"] * 3, np.array([1.0, 2.0, 3.0]))
    assert list(tracker.buffers["a"]) == [2.0, 3.0]
    clone = PerPromptStatTracker(buffer_size=99, min_count=99)
    clone.load_state_dict(tracker.state_dict())
    rewards = np.array([5.0, 7.0])
    np.testing.assert_array_equal(clone.update(["a", "a"], rewards), tracker.update(["a", "a"], rewards))


def _zscore(x):
    x = np.asarray(x, dtype=np.float64)
    return (x - x.mean()) / (x.std() + 1e-6)


def test_two_groups_of_one_prompt_are_each_normalised_by_themselves():
    from ddpo.advantages import group_advantages

    # Groups of 4 (buffer 4 = min_count 4, the group-relative setting); "a" fills groups 0 and 1.
    tracker = PerPromptStatTracker(buffer_size=4, min_count=4)
    rewards = np.array([0.0, 1.0, 2.0, 3.0, 100.0, 101.0, 102.0, 103.0, 5.0, 6.0, 7.0, 9.0])
    prompts = ["a"] * 8 + ["b"] * 4
    adv = group_advantages(tracker, prompts, rewards, np.repeat([0, 1, 2], 4))
    for g in range(3):
        np.testing.assert_allclose(adv[4 * g:4 * g + 4], _zscore(rewards[4 * g:4 * g + 4]), rtol=1e-5)
    # Pooled by prompt text, the first group was normalised by the second's statistics:
    pooled = PerPromptStatTracker(buffer_size=4, min_count=4).update(prompts, rewards)
    assert pooled[0] < -80


def test_the_trainer_normalises_each_group_by_itself():
    from types import SimpleNamespace

    import torch

    from ddpo.config import load_config
    from ddpo.trainer import compute_weights

    config = load_config("tiny_cpu", ["sample.batch_size=8", "sample.images_per_prompt=4", "train.batch_size=4",
                                      "train.stat_buffer_size=4", "train.stat_min_count=4"])
    rewards = np.array([0.0, 1.0, 2.0, 3.0, 100.0, 101.0, 102.0, 103.0], dtype=np.float32)
    rollout = SimpleNamespace(global_index=torch.arange(8), prompts=["a"] * 8, rewards=rewards,
                              valid=np.ones(8, dtype=bool))
    weights, _ = compute_weights(SimpleNamespace(device=torch.device("cpu")), rollout,
                                 PerPromptStatTracker(4, 4), config)
    np.testing.assert_allclose(weights.numpy()[:4], _zscore(rewards[:4]), rtol=1e-5)
    np.testing.assert_allclose(weights.numpy()[4:], _zscore(rewards[4:]), rtol=1e-5)


def test_batch_std_keeps_a_prompt_whose_images_score_alike_small():
    """train.group_std=batch with per-prompt tracking: each prompt's own mean, the epoch's std. A prompt drawn right
    every time (rewards 0.98 +- 0.001) gets advantages of order 0.001 / epoch std, not its noise scaled to +-1."""
    from types import SimpleNamespace

    import torch

    from ddpo.config import load_config
    from ddpo.trainer import compute_weights

    rewards = np.array([0.979, 0.981, 0.980, 0.982, 0.2, 0.9, 0.5, 0.7], dtype=np.float32)  # "easy", then "hard"
    rollout = SimpleNamespace(global_index=torch.arange(8), prompts=["easy"] * 4 + ["hard"] * 4, rewards=rewards,
                              valid=np.ones(8, dtype=bool))
    weights = {}
    for std in ("group", "batch"):
        config = load_config("tiny_cpu", ["sample.batch_size=8", "train.batch_size=4", f"train.group_std={std}",
                                          "train.stat_buffer_size=4", "train.stat_min_count=4"])
        weights[std] = compute_weights(SimpleNamespace(device=torch.device("cpu")), rollout,
                                       PerPromptStatTracker(4, 4), config)[0].numpy()
    np.testing.assert_allclose(weights["group"][:4], _zscore(rewards[:4]), rtol=1e-4)  # noise blown up to +-1.3
    epoch_std = rewards.astype(np.float64).std()
    for lo, hi in ((0, 4), (4, 8)):
        part = rewards[lo:hi].astype(np.float64)
        np.testing.assert_allclose(weights["batch"][lo:hi], (part - part.mean()) / (epoch_std + 1e-6), rtol=1e-4)
    assert np.abs(weights["batch"][:4]).max() < 0.01 < np.abs(weights["batch"][4:]).max()
