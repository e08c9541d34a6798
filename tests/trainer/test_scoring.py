"""Rewards scored beside the rollout: overlap hides reward time, results keep their order, errors surface."""
import time

import pytest
import torch

from megaflow.errors import RewardError
from megaflow.rewards import RewardSet, register_reward
from megaflow.trainer.scoring import ChunkScorer


@register_reward("test_sleepy")
class SleepyReward:
    """Mean pixel value, after sleeping `seconds` (a slow remote reward)."""

    def __init__(self, seconds: float = 0.1) -> None:
        self.seconds = seconds

    def __call__(self, videos, prompts, metadata):
        time.sleep(self.seconds)
        if any(m.get("fail") for m in metadata):
            raise ValueError("the judge is down")
        return videos.float().flatten(1).mean(1)


def _run(overlap: bool, chunks: int = 4, work_s: float = 0.1) -> tuple[ChunkScorer, list]:
    scorer = ChunkScorer(RewardSet({"test_sleepy": 1.0}, {"test_sleepy": {"seconds": 0.1}}), overlap=overlap)
    videos = [torch.full((2, 1, 3, 4, 4), c / chunks) for c in range(chunks)]
    for c, v in enumerate(videos):
        time.sleep(work_s)  # denoising the chunk
        scorer.submit(c, v, ["p", "p"], [{}, {}])
    results = scorer.results()
    scorer.close()
    return scorer, results


def test_overlap_hides_reward_time_behind_the_rollout_and_keeps_the_order():
    serial, expected = _run(overlap=False)
    overlapped, got = _run(overlap=True)
    assert [tag for tag, _ in got] == [0, 1, 2, 3]
    for (_, a), (_, b) in zip(expected, got):
        assert torch.equal(a.components["test_sleepy"], b.components["test_sleepy"])
    assert serial.exposed_s == pytest.approx(serial.reward_s, rel=0.05)
    # Each chunk's 0.1 s of scoring runs while the next chunk's 0.1 s of work goes on: only the
    # last chunk's scoring is exposed.
    assert overlapped.reward_s >= 0.38
    assert overlapped.exposed_s < 0.5 * overlapped.reward_s


def test_a_reward_error_in_the_worker_reaches_the_rollout():
    scorer = ChunkScorer(RewardSet({"test_sleepy": 1.0}, {"test_sleepy": {"seconds": 0.0}}), overlap=True)
    scorer.submit(0, torch.rand(1, 1, 3, 4, 4), ["p"], [{"fail": True}])
    with pytest.raises(RewardError, match="the judge is down"):
        scorer.results()
    scorer.close()
