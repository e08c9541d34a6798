"""Attention backends (`megaflow.parallel.attention`): start-up errors, the backend reaching every
attention call (diffusers' processors and megaflow's Ulysses processors), key masks per backend, and
HunyuanVideo's text trimming. The CUDA kernels cannot run here: diffusers' registry entries of the
non-native backends are replaced by recorders that compute what each kernel computes with torch SDPA,
from exactly the arguments the kernel would get (flash / sage: no mask; varlen: key lengths read as
diffusers' varlen path reads them; xformers: the 4-D mask cast to a bias as diffusers' xformers path does)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models import attention_dispatch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from megaflow.config import load_config, validate_config
from megaflow.errors import ConfigError
from megaflow.models import TextConditioning
from megaflow.models.hunyuan import HunyuanVideoAdapter
from megaflow.models.tiny import TINY_SIZES, tiny_model_dir
from megaflow.parallel.attention import ATTENTION_BACKENDS, apply_attention_backend, attention, trim_text_padding
from megaflow.parallel.wan_sp import WanSequenceParallel
from megaflow.trainer.loop import Trainer

NON_NATIVE = [name for name in ATTENTION_BACKENDS if name != "native"]


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch SDPA in the dispatcher's layout `[B, L, H, d]`."""
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2)


class Kernels:
    """Stand-ins for diffusers' CUDA backends; `calls`: `(backend, key shape, mask dtype or None)`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...], torch.dtype | None]] = []

    def kernel(self, name: str) -> Any:
        def run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
            self.calls.append((name, tuple(key.shape), None if attn_mask is None else attn_mask.dtype))
            b, lq, h, _ = query.shape
            lk = key.shape[1]
            if attn_mask is None:
                return sdpa(query, key, value)
            assert name not in ("flash", "sage"), f"{name} takes no mask"
            if name == "xformers":  # diffusers: 4-D mask → expand → type_as(query), an additive bias
                return sdpa(query, key, value, attn_mask.expand(b, h, lq, lk).type_as(query))
            keys = attention_dispatch._normalize_attn_mask(attn_mask, b, lk)
            prefix = torch.arange(lk) < keys.sum(1, keepdim=True)  # varlen kernels keep key[b, :n_b]
            return sdpa(query, key, value, prefix[:, None, None, :])

        return run

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


@pytest.fixture
def kernels(monkeypatch: pytest.MonkeyPatch) -> Kernels:
    """The recorders in diffusers' registry, and diffusers' requirement check passing."""
    recorder = Kernels()
    for name in ("flash", "flash_varlen", "sage", "sage_varlen", "xformers"):
        monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName(name), recorder.kernel(name))
    monkeypatch.setattr(attention_dispatch, "_check_attention_backend_requirements", lambda backend: None)
    return recorder


@pytest.fixture
def group() -> Iterator[Any]:
    """A real one-process gloo group (Ulysses with sp=1: the all-to-alls are the identity)."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def tiny_config(*overrides: str):
    return load_config("tiny", list(overrides))


# ---- configuration and start-up ---------------------------------------------------------------
def test_unknown_backend_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="model.attention_backend must be one of native, flash, flash_varlen, "
                                          "xformers, sage, got 'flash3'"):
        validate_config(tiny_config("model.attention_backend=flash3"))


@pytest.mark.parametrize("name", ["flash", "flash_varlen", "sage"])
def test_half_precision_kernels_need_bf16(name: str) -> None:
    with pytest.raises(ConfigError, match=f"attention_backend={name} computes in fp16 / bf16 only.*precision=bf16"):
        validate_config(tiny_config(f"model.attention_backend={name}", "train.precision=fp32"))
    validate_config(tiny_config(f"model.attention_backend={name}", "train.precision=bf16"))


@pytest.mark.parametrize("name", NON_NATIVE)
def test_unavailable_backend_is_a_startup_error_naming_the_package(name: str, tmp_path: Path) -> None:
    """No CUDA and none of the packages here: Trainer start-up fails before loading anything."""
    package = ATTENTION_BACKENDS[name].package
    cfg = tiny_config(f"model.attention_backend={name}", "train.precision=bf16", f"output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError) as info:
        Trainer(cfg, show_progress=False)
    message = str(info.value)
    assert f"model.attention_backend={name} cannot run here" in message
    assert f"the package {package} is not installed" in message and "no CUDA device" in message
    assert '.[gpu]' in message and "model.attention_backend=native" in message
    assert not (tmp_path / "run").exists()


# ---- attention() and key masks ----------------------------------------------------------------
def qkv(batch: int, lq: int, lk: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, lq, 2, 8, generator=g), torch.randn(batch, lk, 2, 8, generator=g),
            torch.randn(batch, lk, 2, 8, generator=g))


def joint_mask() -> torch.Tensor:
    """A Ulysses joint key mask `[2, 1, 1, 10]`: 4 image tokens, 2 SP padding, 4 text slots of which
    row 0 has 3 prompt tokens and row 1 has 2."""
    image, pad = [True] * 4, [False] * 2
    rows = [image + pad + [True] * 3 + [False], image + pad + [True] * 2 + [False] * 2]
    return torch.tensor(rows)[:, None, None, :]


def test_native_is_the_exact_sdpa_call() -> None:
    q, k, v = qkv(2, 5, 10)
    mask = joint_mask()
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask, dropout_p=0.0, is_causal=False).transpose(1, 2)
    assert torch.equal(attention(q, k, v, mask, "native"), expected)


@pytest.mark.parametrize("name, kernel, key_length, mask_dtype", [
    ("flash", "flash_varlen", 7, torch.bool),  # shared padding dropped, ragged text → varlen
    ("sage", "sage_varlen", 7, torch.bool),
    ("flash_varlen", "flash_varlen", 7, torch.bool),
    ("xformers", "xformers", 10, torch.float32),  # an additive bias over every key
])
def test_masked_attention_equals_native(kernels: Kernels, name: str, kernel: str, key_length: int,
                                        mask_dtype: torch.dtype) -> None:
    q, k, v = qkv(2, 5, 10)
    mask = joint_mask()
    expected = attention(q, k, v, mask, "native")
    torch.testing.assert_close(attention(q, k, v, mask, name), expected, rtol=1e-6, atol=1e-6)
    assert kernels.calls == [(kernel, (2, key_length, 2, 8), mask_dtype)]


@pytest.mark.parametrize("name", ["flash", "sage"])
def test_shared_padding_only_runs_the_plain_kernel(kernels: Kernels, name: str) -> None:
    """Rows that differ only in padding every row has (SP padding): dropped, then the plain kernel."""
    q, k, v = qkv(2, 5, 10)
    mask = joint_mask()[:1]  # one row for the batch
    torch.testing.assert_close(attention(q, k, v, mask, name), attention(q, k, v, mask, "native"),
                               rtol=1e-6, atol=1e-6)
    assert kernels.calls == [(name, (2, 7, 2, 8), None)]


def test_varlen_refuses_a_mask_with_holes(kernels: Kernels) -> None:
    q, k, v = qkv(2, 5, 10)
    mask = joint_mask().clone()
    mask[1, ..., 2] = False  # row 1 misses an image token row 0 has
    with pytest.raises(ValueError, match="prefix.*holes"):
        attention(q, k, v, mask, "flash")
    with pytest.raises(ValueError, match=r"key mask \[B, 1, 1, L_k=10\]"):
        attention(q, k, v, mask[:, 0], "flash")


# ---- the backend reaches every attention call -------------------------------------------------
def wan_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(2, 4, 2, 4, 4, generator=g), timestep=torch.tensor([300.0, 700.0]),
                encoder_hidden_states=torch.randn(2, 5, 32, generator=g))


@torch.no_grad()
def test_wan_every_attention_runs_on_the_backend(kernels: Kernels, tiny_wan_dir: Path, group: Any) -> None:
    """diffusers' Wan processors (sp=1 model) and megaflow's Ulysses processor (self-attention of the
    sharded model) both run on the configured backend, with unchanged outputs."""
    default = _AttentionBackendRegistry._active_backend
    plain = WanTransformer3DModel.from_pretrained(tiny_wan_dir / "transformer").eval()
    sharded = WanTransformer3DModel.from_pretrained(tiny_wan_dir / "transformer").eval()
    WanSequenceParallel(sharded, group)
    inputs = wan_inputs()
    expected = [m(**inputs, return_dict=False)[0] for m in (plain, sharded)]
    layers = plain.config.num_layers
    for model, want in zip((plain, sharded), expected):
        apply_attention_backend(model, "flash")
        kernels.calls.clear()
        torch.testing.assert_close(model(**inputs, return_dict=False)[0], want, rtol=1e-6, atol=1e-6)
        assert kernels.names() == ["flash"] * 2 * layers  # attn1 and attn2 of every block
    assert _AttentionBackendRegistry._active_backend == default  # diffusers' process-wide default is kept


# ---- HunyuanVideo: masked joint attention and text trimming -----------------------------------
@pytest.fixture(scope="module")
def hunyuan_folder() -> Path:
    return tiny_model_dir("hunyuan")


def hunyuan_inputs(adapter: HunyuanVideoAdapter) -> tuple[torch.Tensor, torch.Tensor, TextConditioning, torch.Tensor]:
    """Two samples whose prompts have 5 and 9 of 16 tokens (right padded)."""
    g = torch.Generator().manual_seed(0)
    config = adapter.transformer.config
    sizes = TINY_SIZES["hunyuan"]
    x = torch.randn(2, *adapter.latent_shape(sizes["frames"], sizes["height"], sizes["width"]), generator=g)
    embeds = torch.randn(2, 16, config.text_embed_dim, generator=g)
    mask = (torch.arange(16) < torch.tensor([[5], [9]])).float()
    pooled = torch.randn(2, config.pooled_projection_dim, generator=g)
    return x, torch.tensor([300.0, 800.0]), TextConditioning(embeds, mask, pooled), torch.full((2,), 6.0)


def load_hunyuan(folder: Path) -> HunyuanVideoAdapter:
    return HunyuanVideoAdapter.from_pretrained(folder, dtype=torch.float32, device="cpu", text_encoders=False)


@torch.no_grad()
def test_hunyuan_text_trimming_is_exact_and_masked_backends_agree(kernels: Kernels, hunyuan_folder: Path) -> None:
    """Trimmed text (9 of 16 tokens) gives the untrimmed velocity under native attention; flash
    (trimmed, then varlen for the ragged prompts) and xformers (untrimmed, additive bias) through
    diffusers' Hunyuan processor give it too."""
    adapter = load_hunyuan(hunyuan_folder)
    x, t, text, guidance = hunyuan_inputs(adapter)
    v = adapter.forward_transformer(x, t, text, {}, guidance)
    embeds, mask = trim_text_padding(text.embeds, text.mask)
    assert embeds.shape[1] == mask.shape[1] == 9
    trimmed = adapter.forward_transformer(x, t, TextConditioning(embeds, mask, text.pooled), {}, guidance)
    torch.testing.assert_close(trimmed, v, rtol=1e-6, atol=1e-6)
    config = adapter.transformer.config
    blocks = config.num_layers + config.num_single_layers
    video = x.shape[2] * x.shape[3] * x.shape[4] // (config.patch_size_t * config.patch_size ** 2)
    for name, kernel, keys, mask_dtype in (("flash", "flash_varlen", video + 9, torch.bool),
                                           ("xformers", "xformers", video + 16, torch.float32)):
        apply_attention_backend(adapter.transformer, name)
        kernels.calls.clear()
        torch.testing.assert_close(adapter.forward_transformer(x, t, text, {}, guidance), v, rtol=1e-6, atol=1e-6)
        assert kernels.calls == [(kernel, (2, keys, config.num_attention_heads, config.attention_head_dim),
                                  mask_dtype)] * blocks


@torch.no_grad()
def test_hunyuan_ulysses_processor_runs_the_backend(kernels: Kernels, hunyuan_folder: Path, group: Any) -> None:
    """megaflow's joint Ulysses processor on flash: trimmed text, the ragged prompts on the varlen
    kernel in every block, the native result."""
    adapter = load_hunyuan(hunyuan_folder)
    adapter.enable_sequence_parallel(group)
    x, t, text, guidance = hunyuan_inputs(adapter)
    v = adapter.forward_transformer(x, t, text, {}, guidance)
    apply_attention_backend(adapter.transformer, "flash")
    torch.testing.assert_close(adapter.forward_transformer(x, t, text, {}, guidance), v, rtol=1e-6, atol=1e-6)
    config = adapter.transformer.config
    assert kernels.names() == ["flash_varlen"] * (config.num_layers + config.num_single_layers)
    assert all(shape[1] == v.shape[1] + 9 for _, shape, _ in kernels.calls)
