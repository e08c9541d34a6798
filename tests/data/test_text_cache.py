"""The text-embedding cache (`megaflow preprocess`, `data.text_cache`): exact round trips for the
tiny Wan / HunyuanVideo / Wan I2V models, training with the cache equal to training without it
(and with no text encoder loaded), fingerprint and missing-prompt errors, `fill`, content keys
that survive editing the prompt file, and a 2-rank gloo preprocess equal to a 1-rank one."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megaflow.config import load_config
from megaflow.data.images import load_image
from megaflow.data.prompts import PromptSet
from megaflow.data.text_cache import (
    Item, TextCache, TextCacheError, TextCacheMissing, encode_items, find_missing, open_for_training, preprocess,
)
from megaflow.models import Conditioning, get_adapter, resolve_model_path
from megaflow.models.tiny import TINY_I2V_PROMPTS, TINY_SIZES
from megaflow.parallel.topology import free_port

#: Edge cases: empty, one word, long enough to be truncated, markup Wan's cleaning changes, repeats.
PROMPTS = [
    "",
    "cat",
    "a red ball bouncing on a beach",
    "a cinematic shot of a city skyline at dawn with clouds drifting over a green valley and stars above the sea",
    "a  &amp; b\twith   spaces",
    "a red ball bouncing on a beach",
]
#: The tiny recipe's prompts and negative prompt (what `megaflow preprocess --config tiny` caches).
TINY_RECIPE = load_config("tiny").data


pytestmark = pytest.mark.usefixtures("one_thread")


def _cache_with(folder: Path, adapter, prompts, images=(), video=None) -> TextCache:
    """A cache of `prompts` (and images) written by the functions `megaflow preprocess` runs."""
    cache = TextCache.for_adapter(folder, adapter, create=True)
    items = [Item("text", p) for p in dict.fromkeys(prompts)] + [Item("image", str(i)) for i in images]
    encode_items(cache, adapter, find_missing(cache, items, video=video), rank=0, batch_size=4, show_progress=False)
    cache.merge_index()
    return cache


def _contents(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a cache folder, by name."""
    out = {}
    for shard in sorted((folder / "shards").glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _tiny_args(model_dir: Path, cache: Path, *extra: str) -> list[str]:
    args = ["--config", "tiny", "--set", f"model.path={model_dir}", "--set", f"data.text_cache={cache}", "--no-progress"]
    for e in extra:
        args += ["--set", e]
    return args


@pytest.fixture(scope="module")
def wan_cache(tmp_path_factory: pytest.TempPathFactory, tiny_wan_dir: Path) -> Path:
    """The tiny recipe's cache, written by `megaflow preprocess` (in this process, one rank)."""
    from megaflow.cli import main

    folder = tmp_path_factory.mktemp("wan-cache") / "cache"
    assert main(["preprocess", *_tiny_args(tiny_wan_dir, folder), "--batch-size", "3"]) == 0
    return folder


@pytest.fixture(scope="module")
def wan(tiny_wan_dir: Path):
    return get_adapter("wan").from_pretrained(tiny_wan_dir, dtype=torch.float32, device="cpu")


# ---- round trips -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wan_round_trip_is_exact_and_stores_only_real_tokens(tmp_path, tiny_wan_dir, dtype):
    adapter = get_adapter("wan").from_pretrained(tiny_wan_dir, dtype=dtype, device="cpu")
    cache = _cache_with(tmp_path, adapter, PROMPTS)
    assert len(cache) == len(set(PROMPTS))  # the repeated prompt is stored once
    online, cached = adapter.encode_prompts(PROMPTS), cache.text(PROMPTS)
    assert cached.embeds.dtype == dtype and cached.mask is None and cached.pooled is None
    assert torch.equal(cached.embeds, online.embeds)
    lengths = {k.removesuffix(".embeds"): t.shape[0] for k, t in _contents(tmp_path).items()}
    assert sorted(lengths.values())[0] < adapter.max_sequence_length  # short prompts: their tokens only
    assert max(lengths.values()) == adapter.max_sequence_length  # the truncated one: all 16


def test_hunyuan_round_trip_gives_the_same_velocity(tmp_path):
    """Masked family: the masked-in embeddings, the mask and the pooled vector are exact; the
    padding (Llama's states at pad tokens) comes back as zeros, which the transformer never reads:
    the velocity, with CFG over a cached negative branch too, is bit-identical."""
    adapter = get_adapter("hunyuan").from_pretrained(resolve_model_path("tiny", "hunyuan"), dtype=torch.float32,
                                                      device="cpu")
    cache = _cache_with(tmp_path, adapter, PROMPTS)
    online, cached = adapter.encode_prompts(PROMPTS), cache.text(PROMPTS)
    assert torch.equal(cached.mask, online.mask) and cached.mask.dtype == online.mask.dtype
    assert torch.equal(cached.pooled, online.pooled)
    keep = online.mask.bool()[..., None]
    assert torch.equal(torch.where(keep, online.embeds, 0), cached.embeds)
    assert online.mask.sum(1).min() < online.mask.shape[1]  # some padding was dropped
    size = TINY_SIZES["hunyuan"]
    shape = adapter.latent_shape(size["frames"], size["height"], size["width"])
    x = torch.randn(len(PROMPTS), *shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.linspace(0.9, 0.2, len(PROMPTS))
    guidance = 6.0 if adapter.transformer.config.guidance_embeds else None
    negative = {"online": adapter.encode_prompts(["cat"]), "cached": cache.text(["cat"])}
    v_online = adapter.velocity(x, sigma, Conditioning(online, negative["online"].expand(len(PROMPTS))), 3.0, guidance)
    v_cached = adapter.velocity(x, sigma, Conditioning(cached, negative["cached"].expand(len(PROMPTS))), 3.0, guidance)
    assert torch.equal(v_online, v_cached)


def test_wan_i2v_caches_the_clip_image_embeddings(tmp_path):
    adapter = get_adapter("wan_i2v").from_pretrained(resolve_model_path("tiny", "wan_i2v"), dtype=torch.float32,
                                                      device="cpu")
    records = PromptSet.from_file(TINY_I2V_PROMPTS)
    video = (TINY_SIZES["wan_i2v"]["height"], TINY_SIZES["wan_i2v"]["width"])
    cache = _cache_with(tmp_path, adapter, records.prompts[:2], records.images[:2], video=video)
    images = torch.stack([load_image(str(p), *video) for p in records.images[:2]])
    assert torch.equal(cache.text(records.prompts[:2]).embeds, adapter.encode_prompts(records.prompts[:2]).embeds)
    shape = adapter.latent_shape(TINY_SIZES["wan_i2v"]["frames"], *video)
    online = adapter.image_conditioning(images, shape)
    cached = adapter.image_conditioning(images, shape, cached=cache.images(images))
    assert online.keys() == cached.keys() and all(torch.equal(online[k], cached[k]) for k in online)
    with pytest.raises(TextCacheMissing, match="conditioning image"):
        cache.images(images.flip(-1))


# ---- training --------------------------------------------------------------------------
def _train(recipe: str, out: Path, *overrides: str) -> tuple[list[dict], object]:
    from megaflow.trainer.loop import Trainer

    cfg = load_config(recipe, [f"output_dir={out}", "train.iterations=2", "train.sample_every=0", *overrides])
    trainer = Trainer(cfg, show_progress=False)
    return trainer.train(), trainer


#: Recipe → overrides: the tiny Wan recipe (CFG with a negative prompt), Wan I2V (cached CLIP-vision
#: image embeddings) and HunyuanVideo with true CFG on top of its embedded guidance (masked text).
TRAIN_CASES = {"tiny": [], "tiny_wan_i2v": [], "tiny_hunyuan": ["sampling.guidance_scale=2.0"]}


@pytest.mark.parametrize("recipe", list(TRAIN_CASES))
def test_training_with_the_cache_equals_training_without_and_loads_no_text_encoder(tmp_path, tiny_wan_dir, wan_cache,
                                                                                    monkeypatch, recipe):
    overrides = [*TRAIN_CASES[recipe], *([f"model.path={tiny_wan_dir}"] if recipe == "tiny" else [])]
    cache = wan_cache
    if recipe != "tiny":
        cache = tmp_path / "cache"
        preprocess(load_config(recipe, [*overrides, f"data.text_cache={cache}"]), show_progress=False)
    plain, _ = _train(recipe, tmp_path / "plain", *overrides)

    def refuse(path):
        raise AssertionError(f"a prompt encoder was loaded from {path}")

    adapter_cls = get_adapter(load_config(recipe).model.family)
    names = list(adapter_cls.encoder_loaders(torch.float32))
    monkeypatch.setattr(adapter_cls, "encoder_loaders", classmethod(lambda cls, dtype: dict.fromkeys(names, refuse)))
    cached, trainer = _train(recipe, tmp_path / "cached", *overrides, f"data.text_cache={cache}")
    assert all(getattr(trainer.adapter, name) is None for name in names) and not trainer.adapter.has_text_encoders
    assert (trainer.negative is not None) == trainer.use_cfg  # the negative prompt came from the cache too
    # Exactly equal: the cached embeddings are bit-identical to the trainer's own encoding (a row does
    # not depend on the batch it is encoded in, measured on this CPU; the padding a masked family gets
    # back as zeros is never read), so every rollout, reward and update is too. Time and peak-memory
    # metrics are not deterministic.
    assert len(plain) == len(cached) == 2
    for a, b in zip(plain, cached):
        same = {k for k in a if not k.startswith(("time/", "memory/"))}
        assert {k: a[k] for k in same} == {k: b[k] for k in same}


def test_a_missing_prompt_is_an_error_naming_it_and_fill_adds_it(tmp_path, tiny_wan_dir, wan_cache, wan):
    new = "a purple elephant juggling teacups"
    cfg = load_config("tiny", [f"output_dir={tmp_path / 'run'}", f"model.path={tiny_wan_dir}",
                               f"data.text_cache={wan_cache}", "train.iterations=1"])
    cfg.data.prompts = [*cfg.data.prompts, new]
    from megaflow.trainer.loop import Trainer

    with pytest.raises(TextCacheMissing, match=rf"1 prompt\(s\) not in the text cache .*'{new}'.*megaflow preprocess"):
        Trainer(cfg, show_progress=False)

    filled = tmp_path / "filled"
    shutil.copytree(wan_cache, filled)
    cfg.data.text_cache, cfg.data.text_cache_missing = str(filled), "fill"
    adapter = get_adapter("wan").from_pretrained(tiny_wan_dir, dtype=torch.float32, device="cpu", text_encoders=False)
    cache = open_for_training(cfg, adapter, PromptSet(cfg.data.prompts), show_progress=False)
    assert adapter.text_encoder is None  # loaded to fill, freed after
    assert torch.equal(cache.text([new]).embeds, wan.encode_prompts([new]).embeds)
    assert len(cache) == len(TextCache.for_adapter(wan_cache, wan, create=False)) + 1
    assert new in {e["source"] for e in json.loads((filled / "index.json").read_text())["entries"].values()}


def test_another_encoding_is_an_error_naming_what_differs(tmp_path, tiny_wan_dir, wan_cache):
    model = tmp_path / "model"
    shutil.copytree(tiny_wan_dir, model)
    config = model / "tokenizer" / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings["model_max_length"] = 8
    config.write_text(json.dumps(settings))

    def error(dtype=torch.float32) -> str:
        adapter = get_adapter("wan").from_pretrained(model, dtype=dtype, device="cpu", text_encoders=False)
        with pytest.raises(TextCacheError) as info:
            TextCache.for_adapter(wan_cache, adapter, create=False)
        return str(info.value)

    message = error()
    assert "max_sequence_length: cache 16, this run 8" in message
    assert "tokenizer/tokenizer_config.json: different file content" in message
    shutil.copy(tiny_wan_dir / "tokenizer" / "tokenizer_config.json", config)
    tokenizer = model / "tokenizer" / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=3))  # another tokenizer file
    message = error()
    assert "tokenizer/tokenizer.json: different file content" in message and "max_sequence_length" not in message
    shutil.copy(tiny_wan_dir / "tokenizer" / "tokenizer.json", tokenizer)
    assert "dtype: cache 'float32', this run 'bfloat16'" in error(torch.bfloat16)
    with pytest.raises(TextCacheError, match="holds no text cache.*megaflow preprocess"):
        TextCache.for_adapter(tmp_path / "nowhere", get_adapter("wan").from_pretrained(
            model, dtype=torch.float32, device="cpu", text_encoders=False), create=False)


def test_content_keys_survive_reordering_and_editing_the_prompt_file(tmp_path, tiny_wan_dir, wan):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\na blue cube\na green tree\n")
    cfg = load_config("tiny", [f"model.path={tiny_wan_dir}", f"data.prompt_file={prompts}",
                               f"data.text_cache={tmp_path / 'cache'}"])
    first = preprocess(cfg, show_progress=False)
    assert (first.encoded, first.entries) == (4, 4)  # three prompts and the negative prompt
    again = preprocess(cfg, show_progress=False)
    assert (again.encoded, again.entries) == (0, 4)  # a rerun skips what is cached
    prompts.write_text("a green tree\na yellow kite\na red ball\na blue cube, edited\n")
    edited = preprocess(cfg, show_progress=False)
    assert (edited.encoded, edited.entries) == (2, 6)  # only the new and the edited prompt
    texts = PromptSet.from_file(prompts).prompts
    cache = TextCache.for_adapter(tmp_path / "cache", wan, create=False)
    assert torch.equal(cache.text(texts).embeds, wan.encode_prompts(texts).embeds)


# ---- ranks -----------------------------------------------------------------------------
@pytest.mark.slow
def test_two_gloo_ranks_write_the_same_cache_as_one(tmp_path, tiny_wan_dir, wan_cache):
    folder = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "megaflow", "preprocess", *_tiny_args(tiny_wan_dir, folder), "--batch-size", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "2 process(es)" in proc.stdout
    shards = sorted(p.name for p in (folder / "shards").glob("*.safetensors"))
    assert [s.split("-")[2] for s in shards] == ["r0000", "r0001"]  # each rank wrote its own shard
    one, two = _contents(wan_cache), _contents(folder)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    index = lambda f: {k: (e["kind"], e["source"]) for k, e in json.loads((f / "index.json").read_text())["entries"].items()}
    assert index(folder) == index(wan_cache)
    assert {s for _, s in index(folder).values()} == {*TINY_RECIPE.prompts, TINY_RECIPE.negative_prompt}
