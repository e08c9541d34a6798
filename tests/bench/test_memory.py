"""`megaflow.bench.memory`: exact tensor bytes of known allocations, from the profiler-based
`measure_peak_bytes` (real runs) and the `TensorMemoryTracker` (fake tensors, the planner)."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from megaflow.bench.memory import TensorMemoryTracker, measure_peak_bytes, peak_of_events


def test_peak_of_events_is_the_running_sums_maximum():
    assert peak_of_events([(0, 100), (1, 50), (2, -100), (3, 20), (4, -70)]) == (150, 0)
    assert peak_of_events([]) == (0, 0)


def test_measure_peak_bytes_sees_allocations_frees_and_a_backwards_saved_tensors():
    x = torch.randn(256, 256, requires_grad=True)          # 256 KiB, allocated before: not counted
    with measure_peak_bytes() as mem:
        a = torch.empty(1 << 20, dtype=torch.uint8)          # 1 MiB
        del a                                                # freed inside: peak 1 MiB, end 0
        y = x.exp()                                          # output kept for backward: 256 KiB
        z = y.sum()
        del y
    assert mem.peak == 1 << 20 and mem.end == 256 * 256 * 4 + 4   # exp's saved output and the sum
    with measure_peak_bytes() as mem:
        z.backward()                # the seed (4 B) and exp's input grad, which becomes x.grad
    assert mem.peak == 256 * 256 * 4 + 4 and x.grad is not None
    assert mem.end == 0             # exp's saved output freed (allocated while profiling: sized)


def test_tensor_memory_tracker_counts_new_storages_not_views_of_weights():
    with FakeTensorMode():
        w = torch.randn(1000, 1000)                          # 4 MB, before the tracker
        tracker = TensorMemoryTracker()
        with tracker:
            wt = w.t()                                        # a view: no new storage
            a = torch.randn(10, 1000)                         # 40 kB
            y = a @ wt                                        # 40 kB
            y.add_(1)                                         # in place: no new storage
            assert tracker.live == 2 * 40_000
            del wt
            z = y.sin()
            del y
            assert tracker.live == 40_000 * 2 and tracker.peak == 3 * 40_000
            del z
        assert tracker.live == 40_000 and tracker.peak == 3 * 40_000      # `a` lives on

