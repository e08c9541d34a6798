"""Attention backends (`model.attention_backend`): native | flash | flash_varlen | xformers | sage.

Every backend except `native` runs through diffusers' attention dispatcher
(`diffusers.models.attention_dispatch.dispatch_attention_fn`, layout `[B, L, H, d]`): diffusers' own
processors get it from `ModelMixin.set_attention_backend`, megaflow's Ulysses processors
(`megaflow.parallel.wan_sp`, `megaflow.parallel.joint_sp`) call `attention(...)` with the backend
set on the processor. `native` is torch's `scaled_dot_product_attention`, called exactly as before
backends existed (the same numerics). A backend that cannot run on this machine (package missing,
version too old, no CUDA) is a `ConfigError` at start-up naming the package and the fix.

Key masks. HunyuanVideo / SkyReels mask the text padding of every prompt in joint attention, and
sequence parallelism masks the zero padding of each sharded part (Ulysses). How each backend takes
a key mask `[B, 1, 1, L_k]` (True = attend):
- `native`: the boolean mask, as before.
- `xformers`: an additive bias (0 / −inf) `[B, 1, 1, L_k]`. diffusers' xformers path expands a 4-D
  mask and casts it to the query's dtype, so a *boolean* mask would become a 0 / 1 bias that masks
  nothing; megaflow hands it the additive form (also to diffusers' Hunyuan processor).
- `flash_varlen`: key-padding lengths (diffusers' varlen path keeps `key[b, :n_b]`).
- `flash`, `sage` (no mask at all): in megaflow's processors `attention` drops the keys that are
  padding in every row (SP padding, the text padding all prompts share), then runs the plain kernel
  when every row is whole and the varlen kernel of the same package (`flash_varlen`, `sage_varlen`)
  for that call when rows still differ (prompts of different lengths). diffusers' Hunyuan processor
  always passes a mask, so it runs the varlen kernel. Before either, the Hunyuan adapter trims the
  text to the longest prompt of the batch (`trim_text_padding`; exact, since padded text is masked out
  of every attention and pooling, and it saves the padded queries), as xDiT drops the padding at
  batch 1. Backends that take the mask leave the text untrimmed, so a sample's velocity never depends
  on the other prompts in its batch (not even in the rounding).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megaflow.errors import ConfigError

log = logging.getLogger("megaflow")

_GPU_EXTRA = 'pip install -e ".[gpu]"'


@dataclass(frozen=True)
class AttentionBackend:
    """One `model.attention_backend` choice: diffusers' `AttentionBackendName` value (None: megaflow
    calls torch SDPA itself), the pip package and module that provide it, how it takes a key mask
    (`bool`, `bias`, `lengths`, `none`), the diffusers backend for rows of different lengths, and
    whether it needs CUDA and fp16 / bf16 inputs."""

    name: str
    diffusers: str | None
    package: str | None = None
    module: str | None = None
    mask: str = "bool"
    varlen: str | None = None
    needs_cuda: bool = False
    half_only: bool = False
    install: str = ""


#: megaflow name → backend. `sageattention` >= 2.1.1 (what diffusers accepts) is not on PyPI (it
#: has 1.x only), so the `gpu` extra cannot include it.
ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "native": AttentionBackend("native", None),
    "flash": AttentionBackend(
        "flash", "flash", "flash-attn", "flash_attn", mask="none", varlen="flash_varlen", needs_cuda=True,
        half_only=True, install=f"pip install flash-attn (or {_GPU_EXTRA})"),
    "flash_varlen": AttentionBackend(
        "flash_varlen", "flash_varlen", "flash-attn", "flash_attn", mask="lengths", varlen="flash_varlen",
        needs_cuda=True, half_only=True, install=f"pip install flash-attn (or {_GPU_EXTRA})"),
    "xformers": AttentionBackend(
        "xformers", "xformers", "xformers", "xformers", mask="bias", needs_cuda=True,
        install=f"pip install xformers (or {_GPU_EXTRA})"),
    "sage": AttentionBackend(
        "sage", "sage", "sageattention", "sageattention", mask="none", varlen="sage_varlen", needs_cuda=True,
        half_only=True, install="sageattention>=2.1.1 is not on PyPI (PyPI has 1.x only, which diffusers refuses), "
                                f"so {_GPU_EXTRA} does not include it: build it from source on the CUDA machine "
                                "(https://github.com/thu-ml/SageAttention, `pip install .` in its clone)"),
}


def backend_spec(name: str) -> AttentionBackend:
    """The backend called `name`; `ConfigError` listing the choices for an unknown one."""
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"model.attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got '{name}'")
    return ATTENTION_BACKENDS[name]


def check_attention_backend(name: str) -> None:
    """`ConfigError` unless backend `name` can run here: its package importable, a CUDA device, and
    diffusers' own requirement check (package version) passing, for it and its varlen kernel."""
    import importlib.util

    spec = backend_spec(name)
    if spec.diffusers is None:
        return
    problems = []
    if importlib.util.find_spec(spec.module) is None:
        problems.append(f"the package {spec.package} is not installed (import {spec.module} fails)")
    if spec.needs_cuda and not torch.cuda.is_available():
        problems.append("it runs on CUDA GPUs only and no CUDA device is visible")
    if not problems:
        from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

        for backend in dict.fromkeys(b for b in (spec.diffusers, spec.varlen) if b):
            try:
                _check_attention_backend_requirements(AttentionBackendName(backend))
            except RuntimeError as exc:
                problems.append(f"diffusers refuses it: {exc}")
    if problems:
        raise ConfigError(f"model.attention_backend={name} cannot run here: {'; '.join(problems)}. Install it: "
                          f"{spec.install}; or set model.attention_backend=native")


def takes_key_mask(transformer: nn.Module) -> bool:
    """Whether the backend `apply_attention_backend` set on `transformer` (native if none) takes a key
    mask; False (flash, sage): text padding should be trimmed first (`trim_text_padding`)."""
    return ATTENTION_BACKENDS[getattr(transformer, "_megaflow_attention_backend", "native")].mask != "none"


def trim_text_padding(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Text `[B, L, D]` and mask `[B, L]` without the trailing tokens that are padding in every row
    (`[B, L', D]`, `[B, L']`, L' = the end of the longest prompt; at least one token)."""
    real = mask.bool().any(0).nonzero()
    length = int(real.max()) + 1 if real.numel() else 1
    return embeds[:, :length], mask[:, :length]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as an additive bias of the same shape: 0 / −inf in `dtype`."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _dispatch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
              backend: str) -> torch.Tensor:
    """diffusers' `dispatch_attention_fn` with backend `backend` (a diffusers backend name)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    return dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                 backend=AttentionBackendName(backend))


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
              backend: str = "native") -> torch.Tensor:
    """Attention of `query [B, L_q, H, d]` over `key`, `value [B, L_k, H, d]` with an optional key mask
    `[B or 1, 1, 1, L_k]` (bool, True = attend) → `[B, L_q, H, d]`, on `backend` (module docstring).
    Under autocast the non-native kernels get q, k, v in the autocast dtype (as SDPA casts them)."""
    if backend == "native":
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=mask, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2)
    spec = ATTENTION_BACKENDS[backend]
    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if mask is None:
        return _dispatch(query, key, value, None, spec.diffusers)
    if mask.ndim != 4 or mask.shape[1:3] != (1, 1) or mask.shape[-1] != key.shape[1]:
        raise ValueError(f"attention backend {backend} takes a key mask [B, 1, 1, L_k={key.shape[1]}], "
                         f"got {tuple(mask.shape)}")
    if spec.mask == "bias":
        return _dispatch(query, key, value, additive_mask(mask, query.dtype), spec.diffusers)
    keys = mask.flatten(1)  # [B or 1, L_k]
    real = keys.any(0)
    if not bool(real.all()):  # keys that are padding in every row: drop them
        keep = real.nonzero().squeeze(1)
        key, value, keys = key[:, keep], value[:, keep], keys[:, keep]
    if bool(keys.all()):
        return _dispatch(query, key, value, None, spec.diffusers)
    lengths = keys.sum(1, keepdim=True)
    if not bool((keys == (torch.arange(keys.shape[1], device=keys.device) < lengths)).all()):
        raise ValueError(f"attention backend {backend} takes each row's real keys as a prefix of the keys that are "
                         "real in some row (the varlen kernels read key lengths); this key mask has holes")
    return _dispatch(query, key, value, keys.expand(query.shape[0], -1), spec.varlen)


@functools.cache
def _hunyuan_bias_processor() -> type:
    """diffusers' `HunyuanVideoAttnProcessor2_0` with its boolean key mask handed on as an additive bias
    (for xformers; module docstring). Built on first use, so importing this module needs no diffusers."""
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    class HunyuanBiasMaskProcessor(HunyuanVideoAttnProcessor2_0):
        def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None,
                     image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
            if attention_mask is not None and attention_mask.dtype == torch.bool:
                attention_mask = additive_mask(attention_mask, hidden_states.dtype)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    return HunyuanBiasMaskProcessor


def apply_attention_backend(transformer: nn.Module, name: str) -> None:
    """Run every attention of `transformer` on backend `name`: diffusers' processors through
    `set_attention_backend` (diffusers' process-wide default is restored, so other models keep
    theirs), megaflow's Ulysses processors through `attention`; HunyuanVideo's masked joint attention
    as the module docstring says. Call after sequence parallelism is enabled. Availability is
    `check_attention_backend`'s job (diffusers re-checks here)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    from megaflow.parallel.joint_sp import UlyssesFluxAttnProcessor, UlyssesJointAttnProcessor
    from megaflow.parallel.wan_sp import UlyssesWanAttnProcessor

    spec = backend_spec(name)
    transformer._megaflow_attention_backend = name
    if spec.diffusers is not None:
        default = _AttentionBackendRegistry._active_backend
        try:
            transformer.set_attention_backend(spec.diffusers)
        finally:
            _AttentionBackendRegistry.set_active_backend(default)
    untouched = set()
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is None:
            continue
        if isinstance(processor, (UlyssesWanAttnProcessor, UlyssesJointAttnProcessor, UlyssesFluxAttnProcessor)):
            processor.backend = name
        elif isinstance(processor, HunyuanVideoAttnProcessor2_0) and spec.diffusers is not None:
            if spec.mask == "none":
                processor._attention_backend = AttentionBackendName(spec.varlen)
            elif spec.mask == "bias":
                module.set_processor(_hunyuan_bias_processor()())
                module.processor._attention_backend = AttentionBackendName(spec.diffusers)
        elif not hasattr(processor, "_attention_backend") and spec.diffusers is not None:
            untouched.add(type(processor).__name__)
    if untouched:
        log.info("model.attention_backend=%s: diffusers' %s call torch SDPA directly and keep it", name,
                 ", ".join(sorted(untouched)))
