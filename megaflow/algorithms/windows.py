"""Where the SDE window of an iteration lies (Flow-GRPO-Fast, MixGRPO; ALGORITHMS.md §3).

A MixGRPO window's position is algorithm state: it moves across iterations, is saved in
checkpoints and restored on resume. State is a JSON-able dict `{"start": c, "held": h}`:
the window starts at step c and has stayed there for h iterations.
"""
from __future__ import annotations

import torch

from megaflow.seeds import generator

WINDOW_STRATEGIES = ("progressive", "random", "frozen", "decay")


def last_window_start(num_steps: int, window_size: int) -> int:
    """The last start of a full MixGRPO window: `N − 2 − w` (the last two steps are never SDE)."""
    last = num_steps - 2 - window_size
    if window_size < 1 or last < 0:
        raise ValueError(f"a window of {window_size} SDE steps needs 1 <= window_size <= num_steps - 2 "
                         f"(num_steps {num_steps}: the last two steps are always ODE)")
    return last


def decayed_interval(interval: int, start: int, last_start: int) -> int:
    """MixGRPO's `decay` strategy: τ(c) falls linearly from `interval` at c = 0 to 1 at the last start."""
    frac = start / last_start if last_start > 0 else 1.0
    return max(1, int(interval * (1 - frac) + frac))


def initial_window_state() -> dict[str, int]:
    """Iteration 0's window: at step 0."""
    return {"start": 0, "held": 0}


def window_start(strategy: str, state: dict[str, int], *, seed: int, iteration: int, last_start: int) -> int:
    """The window's first step at `iteration`: the state's position, or for `random` a uniform
    draw in `0 .. last_start` that depends only on `(seed, iteration)`."""
    if strategy == "random":
        return int(torch.randint(0, last_start + 1, (1,), generator=generator(seed, "mix-window", iteration)))
    if strategy == "frozen":
        return 0
    return int(state["start"])


def advance_window(strategy: str, state: dict[str, int], *, interval: int, stride: int,
                   last_start: int) -> dict[str, int]:
    """The state after one more iteration: `progressive` moves by `stride` every `interval`
    iterations and rolls back to 0 past the last start; `decay` does the same with the interval
    `decayed_interval`; `random` and `frozen` keep no position."""
    if strategy not in ("progressive", "decay"):
        return dict(state)
    start, held = int(state["start"]), int(state["held"]) + 1
    tau = interval if strategy == "progressive" else decayed_interval(interval, start, last_start)
    if held >= tau:
        start, held = start + stride, 0
        if start > last_start:
            start = 0
    return {"start": start, "held": held}


def fast_window_start(window_size: int, window_range: tuple[int, int], *, seed: int, iteration: int) -> int:
    """Flow-GRPO-Fast: the window's start, uniform in `lo .. hi − w` from `(seed, iteration)`."""
    lo, hi = window_range
    return int(torch.randint(lo, hi - window_size + 1, (1,), generator=generator(seed, "fast-window", iteration)))
