"""Scoring decoded chunks while the rollout goes on.

With `overlap`, each chunk's videos are scored in one worker thread while the main thread
denoises the next chunk (on a GPU the worker runs on its own CUDA stream, after the decode's
work is done), so reward time hides behind the rollout. `reward_s` is the time spent scoring;
`exposed_s` the time the rollout waited for it (at most two chunks are in flight, bounding the
videos held on the device).
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Hashable

import torch

from megaflow.rewards import RewardScores, RewardSet

__all__ = ["ChunkScorer"]

#: Chunks scored or waiting at once before the rollout waits for the oldest.
MAX_IN_FLIGHT = 2


class ChunkScorer:
    """Scores chunks of videos `[c, F, 3, H, W]` with a `RewardSet`, in submission order."""

    def __init__(self, rewards: RewardSet, *, overlap: bool) -> None:
        self.rewards = rewards
        self.overlap = overlap
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="megaflow-reward") if overlap else None
        self._stream: Any = None
        self.reset()

    def reset(self) -> None:
        """Start an iteration: no results, zero times."""
        self.reward_s = 0.0
        self.exposed_s = 0.0
        self._done: list[tuple[Hashable, RewardScores]] = []
        self._pending: list[tuple[Hashable, Future]] = []

    def _score(self, videos: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]],
               ready: Any) -> RewardScores:
        t0 = time.perf_counter()
        if ready is None:
            result = self.rewards.score(videos, prompts, metadata)
        else:
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=videos.device)
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                videos.record_stream(self._stream)
                result = self.rewards.score(videos, prompts, metadata)
        self.reward_s += time.perf_counter() - t0
        return result

    def submit(self, tag: Hashable, videos: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> None:
        """Score a chunk (now, or in the worker with `overlap`); its result is kept under `tag`."""
        if self._executor is None:
            t0 = time.perf_counter()
            self._done.append((tag, self._score(videos, prompts, metadata, None)))
            self.exposed_s += time.perf_counter() - t0
            return
        ready = None
        if videos.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        while len(self._pending) >= MAX_IN_FLIGHT:
            self._collect_oldest()
        self._pending.append((tag, self._executor.submit(self._score, videos, prompts, metadata, ready)))

    def _collect_oldest(self) -> None:
        tag, future = self._pending.pop(0)
        t0 = time.perf_counter()
        try:
            result = future.result()
        finally:
            self.exposed_s += time.perf_counter() - t0
        self._done.append((tag, result))

    def results(self) -> list[tuple[Hashable, RewardScores]]:
        """Every chunk's `(tag, scores)` in submission order, after waiting for the last ones."""
        try:
            while self._pending:
                self._collect_oldest()
        finally:
            for _, future in self._pending:
                future.cancel()
            self._pending = []
        return self._done

    def close(self) -> None:
        """Stop the worker thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
