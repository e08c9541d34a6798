"""Exponential moving average (EMA) of the trainable weights, for evaluation and export.

`ema ← decay·ema + (1 − decay)·θ` after every `every`-th optimizer step, kept in float32 next to
the weights it follows. An EMA of the policy lags the raw weights and smooths over the noisy
updates of RL; evaluating and exporting it helps against reward hacking (ALGORITHMS.md §5).

Which tensor is followed:
- single process and ZeRO-2: `p.data`, the whole parameter (every rank holds the same replica,
  so every rank's EMA is the same and rank 0 writes it);
- ZeRO-3: `p.ds_tensor`, this rank's partition of the parameter. The update is elementwise, so
  the EMA of each shard is the shard of the EMA: exact, with no communication and 1/world of the
  memory. Each rank writes its own shard (`ema_rank{r}.safetensors`); `read_ema` assembles whole
  tensors from them the way DeepSpeed partitions a parameter (flattened, padded to a multiple of
  the partition count, rank r holding the r-th equal slice), one tensor at a time.

Use in a trainer (every rank):

    ema = EMA([(n, p) for n, p in transformer.named_parameters() if p.requires_grad],
              decay=cfg.train.ema_decay, every=cfg.train.ema_every, zero_stage=stage)  # after deepspeed.initialize
    ...optimizer step number s (1, 2, ...)...
    ema.update(s)
    with ema.swapped():          # ZeRO-3: collective; every rank, outside a forward and any gather
        evaluate(...)
    save_checkpoint(..., ema=ema) / load_checkpoint(..., ema=ema)
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

#: The EMA of a single-process or ZeRO-2 checkpoint: whole tensors by parameter name.
EMA_FILE = "ema.safetensors"
#: Key of the safetensors metadata entry that describes an EMA file (JSON).
_META_KEY = "megaflow_ema"
_SHARD = re.compile(r"^ema_rank(\d+)\.safetensors$")


def ema_shard_file(rank: int) -> str:
    """The file of rank `rank`'s ZeRO-3 EMA shard in a checkpoint."""
    return f"ema_rank{rank}.safetensors"


class EMA:
    """EMA of `params` (name, parameter), updated every `every` optimizer steps with `decay`.

    Under ZeRO-3 (`zero_stage == 3`) create it on every rank after `deepspeed.initialize` (the
    parameters must already be partitioned); it then follows this rank's partitions."""

    def __init__(self, params: list[tuple[str, nn.Parameter]], decay: float, every: int = 1, zero_stage: int = 0):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < float(decay) < 1.0:
            raise ValueError(f"EMA decay must be a number in (0, 1) (typically 0.9-0.995), got {decay!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"EMA every must be an integer >= 1 (optimizer steps between updates), got {every!r}")
        params = list(params)
        if not params:
            raise ValueError("EMA over no parameters: pass the model's trainable (name, parameter) pairs")
        names = [n for n, _ in params]
        if len(set(names)) != len(names):
            raise ValueError("EMA parameter names must be unique")
        self.decay = float(decay)
        self.every = every
        self.zero_stage = zero_stage
        self.updates = 0  #: how many updates have been applied (restored from checkpoints)
        self._names = names
        self._params = [p for _, p in params]
        self._swapped = False
        self._backup: list[torch.Tensor | None] = []
        self.partition_rank, self.partition_world_size = 0, 1
        if zero_stage == 3:
            missing = [n for n, p in params if getattr(p, "ds_tensor", None) is None]
            if missing:
                raise ValueError(f"ZeRO-3 EMA: parameters {missing[:3]} are not partitioned by DeepSpeed (no "
                                 "ds_tensor); create the EMA after deepspeed.initialize")
            layouts = {(getattr(p, "ds_zero_partition_rank", None), getattr(p, "ds_zero_partition_world_size", None))
                       for p in self._params}
            if len(layouts) != 1 or None in next(iter(layouts)):
                raise ValueError(f"ZeRO-3 EMA: the parameters are partitioned over different groups {sorted(layouts)}; "
                                 "the EMA needs one partition group for all trainable parameters")
            self.partition_rank, self.partition_world_size = next(iter(layouts))
        with torch.no_grad():
            self._shadow = [self._local(p).detach().to(torch.float32, copy=True) for p in self._params]

    # ------------------------------------------------------------------ the tensors followed
    def _local(self, p: nn.Parameter) -> torch.Tensor:
        """The tensor of `p` this rank holds: its ZeRO-3 partition, else the whole parameter."""
        return p.ds_tensor.data if self.zero_stage == 3 else p.data

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def is_swapped(self) -> bool:
        """True inside `swapped()`: the parameters hold the EMA."""
        return self._swapped

    def _full_shape(self, p: nn.Parameter) -> tuple[int, ...]:
        return tuple(p.ds_shape) if self.zero_stage == 3 else tuple(p.shape)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, optimizer_step: int) -> bool:
        """After optimizer step number `optimizer_step` (1, 2, ...): `ema = decay·ema + (1−decay)·θ`
        when `optimizer_step % every == 0`. Returns whether it updated. Local: no communication."""
        if self._swapped:
            raise RuntimeError("EMA.update inside EMA.swapped(): the parameters hold the EMA, not the trained weights")
        if optimizer_step % self.every:
            return False
        for shadow, p in zip(self._shadow, self._params):
            shadow.mul_(self.decay).add_(self._local(p).to(torch.float32), alpha=1.0 - self.decay)
        self.updates += 1
        return True

    # ------------------------------------------------------------------ swapping in and out
    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Within this context the parameters hold the EMA; on exit the trained values are back,
        bit for bit. Under ZeRO-3 the partitions are exchanged and every whole copy of the
        parameters is released first (as before an optimizer step); the persistent parameters
        DeepSpeed keeps whole are gathered again, so it is collective: every rank enters and leaves
        it together, outside a forward, `gathered_for_rollout()` and `gathered()`."""
        if self._swapped:
            raise RuntimeError("EMA.swapped() is already active")
        self._exchange()
        self._swapped = True
        try:
            yield
        finally:
            self._exchange()
            self._swapped = False

    @torch.no_grad()
    def _exchange(self) -> None:
        """Exchange the values of the followed tensors and the shadow: fp32 parameters are swapped
        through one temporary per tensor (no second copy of the model); others are backed up."""
        persistent = self._zero3_release() if self.zero_stage == 3 else []
        entering = not self._swapped
        if entering:
            self._backup = [None] * len(self._params)
        for i, p in enumerate(self._params):
            local = self._local(p)
            if local.dtype == torch.float32 and local.device == self._shadow[i].device:
                tmp = local.clone()
                local.copy_(self._shadow[i])
                self._shadow[i].copy_(tmp)
            elif entering:
                self._backup[i] = local.clone()
                local.copy_(self._shadow[i])
            else:
                local.copy_(self._backup[i])
            if self.zero_stage == 3 and getattr(p, "ds_secondary_tensor", None) is not None:
                p.ds_secondary_tensor = None  # hpZ's copy is rebuilt from ds_tensor, as after an optimizer step
        if not entering:
            self._backup = []
        if persistent:
            persistent[0].all_gather(param_list=persistent)

    def _zero3_release(self) -> list[nn.Parameter]:
        """Before writing ZeRO-3 partitions: release every whole copy of the parameters, as
        DeepSpeed does before an optimizer step (copies a finished forward left behind, and those of
        persistent parameters); returns the persistent ones, to be gathered again after the write.
        Refuses parameters in use: inside a forward or `gathered_for_rollout`, or in flight."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        whole = [p for p in self._params if p.ds_status != ZeroParamStatus.NOT_AVAILABLE]
        busy = [n for n, p in zip(self._names, self._params) if p.ds_status != ZeroParamStatus.NOT_AVAILABLE
                and (p.ds_status == ZeroParamStatus.INFLIGHT or p.ds_active_sub_modules)]
        if busy:
            raise RuntimeError(f"EMA.swapped() under ZeRO-3 while parameters {busy[:3]} are in use: enter and leave "
                               "it outside a forward, gathered_for_rollout() and gathered()")
        if whole:
            whole[0].partition(param_list=whole)
        return [p for p in whole if getattr(p, "ds_persist", False)]

    def _ema_values(self) -> list[torch.Tensor]:
        """The EMA tensors wherever they are now (the parameters inside `swapped()`)."""
        if not self._swapped:
            return self._shadow
        return [self._local(p) if b is None else s for p, s, b in zip(self._params, self._shadow, self._backup)]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """`{"shadow": {name: fp32 tensor (this rank's partition under ZeRO-3)}, "shapes": {name:
        whole shape}, "decay", "every", "updates", "zero_stage", "partition_rank",
        "partition_world_size"}`. The tensors are the live ones: copy before changing them."""
        return {
            "shadow": {n: t.to(torch.float32) for n, t in zip(self._names, self._ema_values())},
            "shapes": {n: list(self._full_shape(p)) for n, p in zip(self._names, self._params)},
            "decay": self.decay, "every": self.every, "updates": self.updates, "zero_stage": self.zero_stage,
            "partition_rank": self.partition_rank, "partition_world_size": self.partition_world_size,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the EMA tensors and update count of `state_dict()` (the same parameter names and
        shapes; under ZeRO-3 the same partition). The decay and interval stay this object's."""
        if self._swapped:
            raise RuntimeError("EMA.load_state_dict inside EMA.swapped()")
        shadow = state["shadow"]
        missing = [n for n in self._names if n not in shadow]
        extra = [n for n in shadow if n not in set(self._names)]
        if missing or extra:
            raise ValueError(f"the saved EMA does not follow this model's trainable parameters (missing {missing[:3]}, "
                             f"unknown {extra[:3]})")
        if (state.get("zero_stage") == 3) != (self.zero_stage == 3):
            kept = {True: "per ZeRO-3 partition", False: "whole"}
            raise ValueError(f"the saved EMA was kept {kept[state.get('zero_stage') == 3]}, this run keeps it "
                             f"{kept[self.zero_stage == 3]}")
        if self.zero_stage == 3 and (state.get("partition_rank"), state.get("partition_world_size")) != (
                self.partition_rank, self.partition_world_size):
            raise ValueError(f"the saved EMA shard is partition {state.get('partition_rank')} of "
                             f"{state.get('partition_world_size')}, this rank holds partition {self.partition_rank} of "
                             f"{self.partition_world_size}")
        for i, name in enumerate(self._names):
            src = shadow[name]
            if tuple(src.shape) != tuple(self._shadow[i].shape):
                raise ValueError(f"saved EMA tensor {name} has shape {tuple(src.shape)}, this run's is "
                                 f"{tuple(self._shadow[i].shape)}")
            self._shadow[i].copy_(src)
        self.updates = int(state.get("updates", 0))

    def save(self, directory: str | Path, rank: int = 0) -> Path | None:
        """Write the EMA into checkpoint `directory`: `ema.safetensors` (whole tensors by name; only
        rank 0 writes) or under ZeRO-3 `ema_rank{rank}.safetensors` (every rank its partition).
        Returns the file written, or None."""
        from safetensors.torch import save_file

        if self.zero_stage != 3 and rank != 0:
            return None
        state = self.state_dict()
        tensors = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in state.pop("shadow").items()}
        state["layout"] = "zero3_partition" if self.zero_stage == 3 else "whole"
        path = Path(directory) / (ema_shard_file(rank) if self.zero_stage == 3 else EMA_FILE)
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(state)})
        return path

    def load(self, directory: str | Path, rank: int = 0) -> None:
        """Restore what `save` wrote into `directory` (this rank's shard under ZeRO-3).
        `FileNotFoundError` when the checkpoint holds no EMA."""
        from safetensors import safe_open

        path = Path(directory) / (ema_shard_file(rank) if self.zero_stage == 3 else EMA_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        with safe_open(str(path), framework="pt") as f:
            state = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
            state["shadow"] = {k: f.get_tensor(k) for k in f.keys()}
        self.load_state_dict(state)


# ---------------------------------------------------------------------- reading checkpoints
def has_ema(checkpoint: str | Path) -> bool:
    """Whether checkpoint directory `checkpoint` holds an EMA (either layout)."""
    checkpoint = Path(checkpoint)
    return (checkpoint / EMA_FILE).is_file() or any(_SHARD.match(p.name) for p in checkpoint.glob("ema_rank*"))


def ema_info(checkpoint: str | Path) -> dict[str, Any] | None:
    """The EMA's description (decay, every, updates, layout, ...) in `checkpoint`, None if absent."""
    from safetensors import safe_open

    checkpoint = Path(checkpoint)
    files = [checkpoint / EMA_FILE] if (checkpoint / EMA_FILE).is_file() else sorted(
        p for p in checkpoint.glob("ema_rank*") if _SHARD.match(p.name))
    if not files:
        return None
    with safe_open(str(files[0]), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(_META_KEY, "{}"))


def read_ema(checkpoint: str | Path) -> dict[str, Callable[[], torch.Tensor]]:
    """The EMA of checkpoint directory `checkpoint` as parameter name → a function that reads that
    whole tensor (fp32), one at a time, memory-mapped: from `ema.safetensors`, or assembled from
    the ZeRO-3 shards `ema_rank*.safetensors` (concatenated in partition order, the padding cut,
    reshaped). Empty when the checkpoint has no EMA. `ValueError` when shards are missing."""
    from safetensors import safe_open

    checkpoint = Path(checkpoint)
    if (checkpoint / EMA_FILE).is_file():
        handle = safe_open(str(checkpoint / EMA_FILE), framework="pt")
        return {name: (lambda n=name: handle.get_tensor(n).to(torch.float32)) for name in handle.keys()}
    shards = sorted(p for p in checkpoint.glob("ema_rank*") if _SHARD.match(p.name))
    if not shards:
        return {}
    by_partition: dict[int, Any] = {}
    world = None
    shapes: dict[str, list[int]] = {}
    for path in shards:
        handle = safe_open(str(path), framework="pt")
        meta = json.loads((handle.metadata() or {}).get(_META_KEY, "{}"))
        if meta.get("layout") != "zero3_partition":
            raise ValueError(f"{path} is not a ZeRO-3 EMA shard written by megaflow")
        if world is not None and meta["partition_world_size"] != world:
            raise ValueError(f"the EMA shards in {checkpoint} disagree on the partition count")
        world = meta["partition_world_size"]
        by_partition[meta["partition_rank"]] = handle
        shapes = meta["shapes"]
    if sorted(by_partition) != list(range(world)):
        raise ValueError(f"the ZeRO-3 EMA of {checkpoint} has shards of partitions {sorted(by_partition)}, "
                         f"expected 0..{world - 1}: the checkpoint is incomplete")
    handles = [by_partition[r] for r in range(world)]

    def whole(name: str) -> torch.Tensor:
        shape = shapes[name]
        numel = math.prod(shape)
        flat = torch.cat([h.get_tensor(name).reshape(-1) for h in handles])
        if flat.numel() < numel:
            raise ValueError(f"the EMA shards of {name} hold {flat.numel()} elements, the parameter {numel}")
        return flat[:numel].reshape(shape).to(torch.float32)

    return {name: (lambda n=name: whole(n)) for name in shapes}


def weights_used(checkpoint: str | Path, ema: bool = True) -> str:
    """Which trainable weights eval and export take from `checkpoint`: "ema" when asked for
    (`ema`) and present, else "trained" (the raw optimizer weights)."""
    return "ema" if ema and ema_info(checkpoint) is not None else "trained"


def describe_weights(checkpoint: str | Path, ema: bool = True) -> str:
    """A phrase for logs and reports: which weights of `checkpoint` are used, and why."""
    info = ema_info(checkpoint)
    if info is None:
        return "the trained weights (the checkpoint has no EMA)"
    if not ema:
        return "the raw trained weights (--no-ema; the checkpoint also has an EMA)"
    return (f"the EMA weights (decay {info.get('decay')}, every {info.get('every')} steps, "
            f"{info.get('updates')} updates)")
