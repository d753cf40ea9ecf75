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
