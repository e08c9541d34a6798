"""Live tensor bytes and their peak: the CPU counterpart of `torch.cuda.max_memory_allocated`.

`measure_peak_bytes` is the measurement for real runs: on CPU it reads every allocation and free
(with its size) that torch's profiler records inside the block (`profile_memory=True`, overhead
~1.1x) and takes the peak of their running sum; on CUDA it uses `torch.cuda.max_memory_allocated`.
Both count tensor bytes allocated inside the block above what was live on entry, not allocator or
library overhead (RSS):

    with measure_peak_bytes() as mem:
        trainer.run_iteration(0)
    print(mem.peak, mem.end)     # bytes above entry: the peak, and what is still allocated at exit

`TensorMemoryTracker` is a `TorchDispatchMode` that records the storage of every tensor an op
creates on the tracked device (weak references to the C++ storages, so a tensor kept only by
autograd's saved-tensor machinery still counts, and a storage counts once however many views share
it) and keeps the peak of the live total. It measures what a memory model of tensors predicts,
not allocator or library overhead (RSS). Tensors that exist before the tracker starts are not
counted (`baseline` lets a caller add them). Only ops in the tracking thread are seen.

    with peak_tensor_bytes() as mem:
        train_one_iteration()
    print(mem.peak, mem.live)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _fresh_outputs(func: Any, out: Any) -> list[torch.Tensor]:
    """The tensors `func` returned in new storage: not views or in-place results of its inputs
    (those alias storage that is either tracked already or existed before, e.g. a weight's `t()`)."""
    returns = getattr(getattr(func, "_schema", None), "returns", None)
    if returns is not None and any(r.alias_info is not None for r in returns):
        if len(returns) == 1:
            return []
        outs = out if isinstance(out, (tuple, list)) and len(out) == len(returns) else None
        if outs is None:
            return []
        return [t for r, o in zip(returns, outs) if r.alias_info is None
                for t in tree_flatten(o)[0] if isinstance(t, torch.Tensor)]
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


class TensorMemoryTracker(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created on `device` (a device type, "cpu") while
    active; `peak` is the largest live total seen after any op, `live` the total now."""

    def __init__(self, device: str = "cpu", baseline: int = 0) -> None:
        super().__init__()
        self.device = device
        self.baseline = int(baseline)
        self._storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self._bound = 0          # registered bytes, some possibly freed: an upper bound of live
        self.peak = self.baseline

    def _sweep(self) -> int:
        """Drop freed storages; the exact live total (without the baseline)."""
        alive = {key: (ref, size) for key, (ref, size) in self._storages.items() if not ref.expired()}
        self._storages = alive
        self._bound = sum(size for _, size in alive.values())
        return self._bound

    def _record(self, t: torch.Tensor) -> None:
        if t.device.type != self.device or getattr(t, "is_sparse", False):
            return
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self._storages.get(key)
        size = storage.nbytes()
        if entry is not None and not entry[0].expired():
            if size != entry[1]:                      # resized in place
                self._bound += size - entry[1]
                self._storages[key] = (entry[0], size)
            return
        if entry is not None:
            self._bound -= entry[1]
        self._storages[key] = (StorageWeakRef(storage), size)
        self._bound += size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in _fresh_outputs(func, out):
            self._record(t)
        if self.baseline + self._bound > self.peak:
            self.peak = max(self.peak, self.baseline + self._sweep())
        return out

    @property
    def live(self) -> int:
        """Bytes of tracked storages alive now, plus the baseline."""
        return self.baseline + self._sweep()

    def reset_peak(self) -> None:
        """Restart the peak from the live total (like `torch.cuda.reset_peak_memory_stats`)."""
        self.peak = self.live


@contextlib.contextmanager
def peak_tensor_bytes(device: str = "cpu", baseline: int = 0) -> Iterator[TensorMemoryTracker]:
    """Track live tensor bytes on `device` within the block; read `.peak` / `.live` of the result."""
    tracker = TensorMemoryTracker(device, baseline)
    with tracker:
        yield tracker


@dataclass
class PeakBytes:
    """Result of `measure_peak_bytes`: `peak` is the largest live total of tensor bytes allocated
    inside the block (above what was live on entry), `end` what of it is still allocated at exit."""

    device: str
    peak: int = 0
    end: int = 0


def _cpu_memory_events(prof: Any) -> list[tuple[int, int]]:
    """`(time ns, bytes)` of every CPU allocation (> 0) and free (< 0) the profiler recorded."""
    cpu = torch.autograd.DeviceType.CPU
    return sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == cpu)


def peak_of_events(events: list[tuple[int, int]]) -> tuple[int, int]:
    """`(peak, end)` of the running sum of allocation sizes (frees negative), in time order."""
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live


@contextlib.contextmanager
def measure_peak_bytes(device: str | torch.device = "cpu") -> Iterator[PeakBytes]:
    """Peak tensor bytes allocated inside the block on `device` ("cpu" or a CUDA device), above
    what was live on entry; read `.peak` and `.end` of the result after the block. On CPU every
    allocation of every thread is seen (torch's profiler); frees of memory allocated while no
    memory profiling ran are NOT (the profiler cannot size them and warns "Memory block of unknown
    size"), so allocate inside the block whatever the measured code frees (e.g. gradients it zeroes)."""
    dev = torch.device(device)
    result = PeakBytes(str(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        yield result
        torch.cuda.synchronize(dev)
        result.peak = torch.cuda.max_memory_allocated(dev) - start
        result.end = torch.cuda.memory_allocated(dev) - start
        return
    if dev.type != "cpu":
        raise ValueError(f"measure_peak_bytes measures cpu or cuda memory, not {dev.type}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    result.peak, result.end = peak_of_events(_cpu_memory_events(prof))
