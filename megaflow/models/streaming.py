"""Writing a diffusers model folder one tensor at a time.

`ModelMixin.save_pretrained` needs the whole state dict in memory; under ZeRO-3 that means
gathering a 14B transformer on every rank at once. Here the layout is the same (`config.json`,
safetensors shards named by huggingface_hub's planner, the index file), but the shards are
planned from the tensors' shapes alone, each file's header is written first, and the tensors are
then streamed in, so at most one module's parameters are whole at any time.
"""
from __future__ import annotations

import contextlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator

import torch
from torch import nn

#: diffusers' file names (`diffusers.utils.constants`).
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"
DEFAULT_MAX_SHARD_SIZE = "10GB"  #: diffusers' default

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}

#: A context in which the given parameters are whole (ZeRO-3: gathered); a no-op elsewhere.
Gather = Callable[[list[nn.Parameter]], ContextManager[Any]]


def no_gather(params: list[nn.Parameter]) -> ContextManager[Any]:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class TensorSpec:
    """What a safetensors header records of one tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsStreamWriter:
    """One safetensors file whose tensors (`specs`, in file order) are known before any is
    written: the header goes first, then `write(name, tensor)` appends each in that order."""

    def __init__(self, path: str | Path, specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, spec in specs.items():
            if spec.dtype not in _SAFETENSORS_DTYPES:
                raise ValueError(f"safetensors cannot store {name} of dtype {spec.dtype}")
            header[name] = {"dtype": _SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.path = Path(path)
        self._order = list(specs.items())
        self._next = 0
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor` as `name`, which must be the next tensor of the header."""
        if self._next >= len(self._order) or self._order[self._next][0] != name:
            expected = self._order[self._next][0] if self._next < len(self._order) else "nothing"
            raise ValueError(f"{self.path.name}: got tensor {name}, expected {expected}")
        spec = self._order[self._next][1]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{self.path.name}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                             f"its header says {spec.dtype} {spec.shape}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            self._file.close()
            raise ValueError(f"{self.path.name}: {len(self._order) - self._next} tensors were never written")
        self._file.close()


def write_safetensors_folder(folder: str | Path, specs: dict[str, TensorSpec],
                             tensors: Iterable[tuple[str, torch.Tensor]], *, write: bool = True,
                             max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Write `tensors` (name, tensor), yielded in the order of `specs`, as diffusers' weight files:
    one `diffusion_pytorch_model.safetensors`, or numbered shards of at most `max_shard_size` and
    `diffusion_pytorch_model.safetensors.index.json`. With `write=False` the tensors are drawn
    (collectives inside the iterator still run) and nothing is written."""
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(specs, get_storage_size=lambda s: s.nbytes,
                                                 filename_pattern=_WEIGHTS_PATTERN, max_shard_size=max_shard_size)
    folder = Path(folder)
    writers: dict[str, SafetensorsStreamWriter] = {}
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        for filename, names in split.filename_to_tensors.items():
            writers[filename] = SafetensorsStreamWriter(folder / filename, {n: specs[n] for n in names},
                                                        metadata={"format": "pt"})
    seen = 0
    for name, tensor in tensors:
        if write:
            writers[split.tensor_to_filename[name]].write(name, tensor)
        seen += 1
    if seen != len(specs):
        raise ValueError(f"{len(specs) - seen} of the {len(specs)} tensors planned for {folder} never came")
    if not write:
        return
    for writer in writers.values():
        writer.close()
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _param_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's full shape, also when ZeRO-3 has partitioned it (`ds_shape`)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def module_tensor_specs(model: nn.Module) -> dict[str, TensorSpec]:
    """Every parameter and persistent buffer of `model` by state-dict name, module by module."""
    specs: dict[str, TensorSpec] = {}
    for mod_name, params, buffers in _module_entries(model):
        for name, t in params + buffers:
            specs[f"{mod_name}.{name}" if mod_name else name] = TensorSpec(t.dtype, _param_shape(t))
    return specs


def _module_entries(model: nn.Module) -> Iterator[tuple[str, list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]]:
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in params)
        buffers = [(n, b) for n, b in module.named_buffers(recurse=False)
                   if b is not None and n not in module._non_persistent_buffers_set]
        if params or buffers:
            yield mod_name, params, buffers


def module_tensors(model: nn.Module, gather: Gather = no_gather) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` of `module_tensor_specs`, one module's parameters made whole at a time."""
    for mod_name, params, buffers in _module_entries(model):
        prefix = f"{mod_name}." if mod_name else ""
        with gather([p for _, p in params]):
            for name, t in params + buffers:
                yield prefix + name, t.data


def save_model_streaming(model: nn.Module, folder: str | Path, *, gather: Gather = no_gather, write: bool = True,
                         max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
    """`model.save_pretrained(folder)`'s layout (config.json and safetensors shards) written module
    by module: under ZeRO-3 every rank calls it with `gather` (the gathers are collective) and
    only the rank with `write` writes. Peak extra memory is one module's parameters."""
    folder = Path(folder)
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        model.save_config(folder)
    write_safetensors_folder(folder, module_tensor_specs(model), module_tensors(model, gather), write=write,
                             max_shard_size=max_shard_size)


def open_weights(folder: str | Path) -> dict[str, Any]:
    """Tensor name → open safetensors handle for every `*.safetensors` file of a diffusers weights
    folder (one file or shards); nothing is read yet."""
    from safetensors import safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    handles = [safe_open(str(f), framework="pt") for f in files]
    return {key: h for h in handles for key in h.keys()}


def load_model_streaming(model: nn.Module, folder: str | Path, *, gather: Gather = no_gather,
                         read: bool = True) -> None:
    """Copy the parameters of a diffusers weights folder into `model`, one module at a time and
    one tensor read at a time. Under ZeRO-3 every rank calls it with a `gather` in which the
    rank with `read` may modify the whole parameters (`GatheredParameters(modifier_rank=...)`);
    buffers are left as the model computed them."""
    if not any(Path(folder).glob("*.safetensors")):  # checked on every rank: no rank waits for a failed one
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    where = open_weights(folder) if read else {}
    for mod_name, params, _ in _module_entries(model):
        with gather([p for _, p in params]):
            if not read:
                continue
            for name, param in params:
                key = f"{mod_name}.{name}" if mod_name else name
                if key not in where:
                    raise KeyError(f"weight {key} is missing from {folder}")
                with torch.no_grad():
                    param.data.copy_(where[key].get_tensor(key).to(param.dtype))
