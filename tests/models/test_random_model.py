"""Real-size models with random weights (`megaflow.models.random_model`): scales, scaled configs,
the weightless folders, the meta / device loader, the `random:` model path in the trainer and the
ZeRO-3 loader's `weights=False`."""
from __future__ import annotations

import inspect
import json
import multiprocessing
import os
import resource
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights

from megaflow.errors import ConfigError
from megaflow.models import resolve_model_path
from megaflow.models.real import REAL_MODELS
from megaflow.models.random_model import (
    RANDOM_MARKER, Scale, is_random_folder, random_model_folder, random_transformer_loader, random_weights_seed,
    real_model_of_recipe, released_vae, scaled_transformer_config,
)

#: The small scale the CPU tests use: 2 heads of 128, one or two blocks of each kind.
SMALL = Scale(width=0.05, depth=0.04)


def _model_cls(config: dict):
    import diffusers

    return getattr(diffusers, config["_class_name"])


def _config_folder(path: Path, config: dict) -> Path:
    """A folder with only `config.json`: what the loader reads (a random folder's `transformer/`)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def random_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root shared by this file's tests (the random folders are written once)."""
    return tmp_path_factory.mktemp("random-cache")


# ---- Scale -------------------------------------------------------------------------------------


def test_scale_parses_the_three_forms_and_its_label_round_trips():
    assert Scale.parse("1") == Scale() == Scale(1.0, 1.0)
    assert Scale.parse("0.25") == Scale(0.25, 0.25)
    assert Scale.parse("width=0.25,depth=0.1") == Scale(0.25, 0.1)
    assert Scale.parse(" depth = 0.5 ") == Scale(1.0, 0.5)
    s = Scale(0.25, 0.1)
    assert str(s) == "w0.25-d0.1" and str(Scale()) == "w1-d1"
    assert s.label == "width=0.25,depth=0.1"
    for scale in (s, Scale(), Scale(1 / 3, 0.07), SMALL):
        assert Scale.parse(scale.label) == scale
        assert "/" not in str(scale) and " " not in str(scale)


@pytest.mark.parametrize("text, problem", [
    ("", "empty"), ("abc", "not a number"), ("0", "(0, 1]"), ("1.5", "(0, 1]"), ("-0.5", "(0, 1]"),
    ("nan", "(0, 1]"), ("height=0.5", "width=X or depth=X"), ("width=0.1,width=0.2", "twice"),
    ("width=0.5;depth=0.1", "not a number"),
])
def test_scale_rejects_bad_text_with_the_problem_named(text, problem):
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Scale.parse(text)


# ---- scaled configs ----------------------------------------------------------------------------


def test_scaled_configs_shrink_heads_widths_and_depth():
    wan = scaled_transformer_config("wan2.1_t2v_14b", Scale(0.25, 0.1))
    assert (wan["num_attention_heads"], wan["attention_head_dim"]) == (10, 128)  # 40 × 0.25, head dim kept
    assert (wan["ffn_dim"], wan["text_dim"], wan["num_layers"]) == (3456, 1024, 4)
    i2v = scaled_transformer_config("wan2.1_i2v_14b_480p", Scale(0.25, 0.1))
    assert (i2v["image_dim"], i2v["added_kv_proj_dim"], i2v["in_channels"]) == (320, 10 * 128, 36)
    hy = scaled_transformer_config("hunyuan_video_t2v", Scale(0.25, 0.1))
    assert (hy["num_attention_heads"], hy["attention_head_dim"], hy["rope_axes_dim"]) == (6, 128, [16, 56, 56])
    assert (hy["num_layers"], hy["num_single_layers"], hy["num_refiner_layers"]) == (2, 4, 1)
    assert (hy["text_embed_dim"], hy["pooled_projection_dim"]) == (1024, 192)
    sd3 = scaled_transformer_config("sd3.5_medium", Scale(0.25, 0.5))
    assert sd3["caption_projection_dim"] == 6 * 64 and sd3["pooled_projection_dim"] == 192 + 320
    assert (sd3["num_layers"], sd3["dual_attention_layers"]) == (12, list(range(6)))  # 13 of 24 → 6 of 12
    # Heads stay a multiple of 2 (sp=2 works) and at least 2; every width a multiple of 16.
    for name in REAL_MODELS:
        assert scaled_transformer_config(name, Scale()) == REAL_MODELS[name].config()
        for scale in (Scale(0.01, 0.01), SMALL, Scale(0.3, 0.3), Scale(0.77, 1.0)):
            config = scaled_transformer_config(name, scale)
            heads = config["num_attention_heads"]
            assert heads >= 2 and heads % 2 == 0
            assert config["attention_head_dim"] == REAL_MODELS[name].config()["attention_head_dim"]
            for key in ("ffn_dim", "text_dim", "image_dim", "text_embed_dim", "pooled_projection_dim",
                        "joint_attention_dim"):
                if config.get(key) is not None:
                    assert config[key] % 16 == 0 and config[key] >= 16, (name, key)
            for key in ("num_layers", "num_single_layers", "num_refiner_layers"):
                if key in config:
                    assert config[key] >= 1


def test_names_and_recipes_are_checked():
    assert real_model_of_recipe("hunyuan_t2v").name == "hunyuan_video_t2v"
    with pytest.raises(ConfigError, match="wan_t2v_1_3b"):
        real_model_of_recipe("tiny")
    with pytest.raises(ConfigError, match="wan2.1_t2v_14b"):
        scaled_transformer_config("wan2.1_t2v_13b", Scale())
    with pytest.raises(ConfigError, match="random:wan2.1_t2v_1.3b, random:wan2.1_t2v_14b"):
        resolve_model_path("random:wan2.1_t2v_13b", "wan")
    with pytest.raises(ConfigError, match="a hunyuan model 'hunyuan_video_t2v'.*random:wan2.1_i2v_14b_480p"):
        resolve_model_path("random:hunyuan_video_t2v@0.1", "wan_i2v")
    with pytest.raises(ConfigError, match="not a number"):
        resolve_model_path("random:wan2.1_t2v_1.3b@small", "wan")


# ---- the folder --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, vae_channels", [("wan2.1_t2v_1.3b", 8), ("hunyuan_video_t2v", 32)])
def test_random_folder_has_a_weightless_transformer_and_the_real_vae_structure(random_cache, name, vae_channels):
    from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLWan
    from safetensors import safe_open

    folder = random_model_folder(name, SMALL, cache_root=random_cache)
    assert folder == random_model_folder(name, SMALL, cache_root=random_cache)  # written once
    assert is_random_folder(folder) and not is_random_folder(folder.parent)
    assert sorted(p.name for p in (folder / "transformer").iterdir()) == ["config.json", RANDOM_MARKER]
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert {k: config[k] for k in scaled_transformer_config(name, SMALL)} == scaled_transformer_config(name, SMALL)
    assert json.loads((folder / "transformer" / RANDOM_MARKER).read_text()) == {"name": name, "scale": SMALL.label}
    vae_cls = AutoencoderKLWan if name.startswith("wan") else AutoencoderKLHunyuanVideo
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    # diffusers' default configs of these VAEs are the released ones: only the width differs.
    released = {k: p.default for k, p in inspect.signature(vae_cls.__init__).parameters.items() if k != "self"}
    width_key = "base_dim" if name.startswith("wan") else "block_out_channels"
    for key, value in released.items():
        if key != width_key:
            assert vae_config[key] == (list(value) if isinstance(value, tuple) else value), key
    first = vae_config[width_key] if name.startswith("wan") else vae_config[width_key][0]
    assert first == vae_channels
    with safe_open(str(folder / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


#: Parameters (millions) of the released VAEs, as their published weight files hold them.
RELEASED_VAE_M = {"wan": 126.9, "hunyuan": 246.5, "flux": 83.8, "sd3": 83.8}


@pytest.mark.parametrize("family", sorted(RELEASED_VAE_M))
def test_released_vae_is_the_published_structure(family):
    """What `megaflow plan` prices when no model folder is on disk: the real-size VAE, built on meta."""
    with torch.device("meta"):
        vae = released_vae(family)
        twin = released_vae({"wan": "wan_i2v", "hunyuan": "skyreels_i2v"}.get(family, family))
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 1) == RELEASED_VAE_M[family]
    assert dict(vae.config) == dict(twin.config)


@pytest.mark.parametrize("family, name, text_shape", [
    ("wan_i2v", "wan2.1_i2v_14b_480p", (512, 208)),  # Wan I2V's text is exactly 512 tokens
    ("skyreels_i2v", "skyreels_v1_hunyuan_i2v", (256, 208)),
    ("flux", "flux1_dev", (512, 208)),
    ("sd3", "sd3.5_medium", (77 + 128, 208)),  # CLIP-L ‖ CLIP-G padded to T5's width, then T5's 128
])
def test_every_family_loads_its_random_folder_and_runs_a_forward(random_cache, family, name, text_shape):
    from megaflow.models import get_adapter
    from megaflow.models.base import Conditioning

    folder = random_model_folder(name, SMALL, cache_root=random_cache)
    adapter = get_adapter(family).from_pretrained(folder, dtype=torch.float32, device="cpu",
                                                  transformer_loader=random_transformer_loader("cpu"))
    config = adapter.transformer.config
    text = adapter.encode_prompts(["a red ball rolling"])
    assert tuple(text.embeds.shape[1:]) == text_shape
    if text.pooled is not None:
        assert text.pooled.shape[1] == config.pooled_projection_dim
    size = 16 if family in ("wan_i2v", "skyreels_i2v") else 32
    shape = adapter.latent_shape(1, size, size)
    extra = adapter.image_conditioning(torch.rand(1, 3, size, size), shape) if adapter.needs_image else {}
    if family == "wan_i2v":  # CLIP ViT-H/14's 257 image tokens of width image_dim
        assert tuple(extra["image_embeds"].shape[1:]) == (257, config.image_dim)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    v = adapter.velocity(x, torch.tensor([0.5]), Conditioning(text, extra=extra),
                         embedded_guidance=adapter.default_embedded_guidance)
    assert v.shape == x.shape and v.isfinite().all() and 0.2 < v.std().item() < 5


# ---- the loader --------------------------------------------------------------------------------


def test_loader_builds_the_real_14b_on_meta_without_host_memory(tmp_path):
    config = scaled_transformer_config("wan2.1_t2v_14b", Scale())
    cls = _model_cls(config)
    with init_empty_weights(include_buffers=False):
        plain = cls.from_config(config)
    expected = sum(p.numel() for p in plain.parameters())
    del plain
    folder = _config_folder(tmp_path / "transformer", config)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, peak
    model = random_transformer_loader("meta", seed=3)(cls, folder, torch.bfloat16)
    growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    params = list(model.named_parameters())
    assert sum(p.numel() for _, p in params) == expected and 14.0e9 < expected < 14.5e9
    assert all(p.is_meta for _, p in params)
    assert {p.dtype for n, p in params if "scale_shift_table" in n} == {torch.float32}  # keep-in-fp32 modules
    assert {p.dtype for n, p in params if ".ffn." in n} == {torch.bfloat16}
    assert growth_mib < 500  # the weights alone would be 28 GB in bf16


def _small_wan(tmp_path: Path, name: str = "wan2.1_t2v_1.3b", scale: Scale = SMALL, *, dtype=torch.bfloat16,
               seed: int = 0) -> torch.nn.Module:
    config = scaled_transformer_config(name, scale)
    folder = _config_folder(tmp_path / f"{name}-{scale}", config)
    return random_transformer_loader("cpu", seed=seed)(_model_cls(config), folder, dtype)


def test_loader_is_deterministic_and_matches_from_pretrained_dtypes_and_buffers(tmp_path):
    from diffusers import WanTransformer3DModel

    model = _small_wan(tmp_path)
    state = model.state_dict()
    again = _small_wan(tmp_path).state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)
    other = _small_wan(tmp_path, seed=1).state_dict()
    assert not torch.equal(state["blocks.0.ffn.net.0.proj.weight"], other["blocks.0.ffn.net.0.proj.weight"])
    # The reference: a plain build saved and loaded by diffusers in bf16.
    plain_dir = tmp_path / "plain"
    WanTransformer3DModel.from_config(scaled_transformer_config("wan2.1_t2v_1.3b", SMALL)).save_pretrained(plain_dir)
    loaded = WanTransformer3DModel.from_pretrained(plain_dir, torch_dtype=torch.bfloat16)
    ref_params = dict(loaded.named_parameters())
    params = dict(model.named_parameters())
    assert {n: p.dtype for n, p in params.items()} == {n: p.dtype for n, p in ref_params.items()}
    assert {p.dtype for p in params.values()} == {torch.float32, torch.bfloat16}
    buffers, ref_buffers = dict(model.named_buffers()), dict(loaded.named_buffers())
    assert buffers.keys() == ref_buffers.keys() and buffers
    assert all(torch.equal(buffers[k], ref_buffers[k]) and buffers[k].dtype == ref_buffers[k].dtype for k in buffers)
    # The init rule: weights N(0, 1/fan_in), biases 0, norm weights 1.
    w = params["blocks.0.ffn.net.0.proj.weight"].float()
    assert abs(w.std().item() * w.shape[1] ** 0.5 - 1) < 0.02 and abs(w.mean().item()) < 0.01
    assert not params["blocks.0.ffn.net.0.proj.bias"].any()
    assert torch.all(params["blocks.0.attn1.norm_q.weight"] == 1)


def test_a_real_depth_bf16_forward_stays_order_one(tmp_path):
    # Wan 14B's 40 blocks, narrow: activations stay O(1) through the whole depth in bf16.
    model = _small_wan(tmp_path, "wan2.1_t2v_14b", Scale(width=0.05, depth=1.0))
    assert len(model.blocks) == 40
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 4, 4, generator=gen).to(torch.bfloat16)
    text = torch.randn(1, 16, model.config.text_dim, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        out = model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                    return_dict=False)[0].float()
    assert out.isfinite().all() and 0.2 < out.std().item() < 5


# ---- the trainer on random:NAME ----------------------------------------------------------------


def _random_trainer(tmp_path: Path, recipe: str, name: str, frames: int, *extra: str):
    from megaflow.config import load_config
    from megaflow.trainer.loop import Trainer

    cfg = load_config(recipe, [
        f"output_dir={tmp_path}", f"model.path=random:{name}@{SMALL.label}", "train.iterations=1",
        "train.sample_every=0", "train.save_every=0", "data.prompt_file=null",
        "data.prompts=[a red ball rolling, a blue cube spinning]", "data.prompts_per_iteration=1",
        f"video.frames={frames}", "video.height=16", "video.width=16", "sampling.num_steps=2",
        "sampling.guidance_scale=1.0", "rollout.group_size=2", "rollout.chunk_size=2", "rollout.best_of=null",
        "rollout.gather_weights=false", "algorithm.timestep_fraction=0.5", "reward.components={brightness: 1.0}",
        "parallel.zero_stage=0", "parallel.sp_size=1", "parallel.hpz_partition_size=1", "train.micro_batch_size=2",
        "train.grad_accum=null", "train.precision=fp32", "train.grad_checkpointing=0", *extra,
    ])
    return Trainer(cfg, show_progress=False)


@pytest.mark.parametrize("recipe, name, frames, lora", [
    ("wan_t2v_1_3b", "wan2.1_t2v_1.3b", 1, True),
    ("hunyuan_t2v", "hunyuan_video_t2v", 1, False),
])
def test_trainer_runs_an_iteration_on_a_random_model(tmp_path, random_cache, monkeypatch, recipe, name, frames, lora):
    """An iteration trains; its checkpoint exports, and `megaflow eval` loads the random base model
    (the run's seed) and the checkpoint, although the random folder has no weights on disk."""
    from megaflow.demo.evaluate import load_model
    from megaflow.trainer.export import export_checkpoint
    from megaflow.trainer.state import checkpoint_dir

    monkeypatch.setenv("MEGAFLOW_CACHE", str(random_cache))
    trainer = _random_trainer(tmp_path, recipe, name, frames, "train.save_every=1")
    assert trainer.cfg.model.lora is lora
    # The transformer is the random one of the run's seed (LoRA wraps the frozen base weights).
    folder = random_model_folder(name, SMALL, cache_root=random_cache)
    transformer = trainer.adapter.transformer
    expected = random_transformer_loader("cpu", seed=random_weights_seed(trainer.cfg.seed))(
        type(transformer), folder / "transformer", torch.float32).state_dict()
    got = {k.replace(".base_layer", ""): v for k, v in transformer.state_dict().items() if "lora_" not in k}
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    [metrics] = trainer.train()
    assert metrics["policy/ratio_max_dev"] == 0.0  # on-policy first micro-step
    assert metrics["optim/grad_norm"] > 0 and all(
        torch.tensor(metrics[k]).isfinite() for k in ("loss/total", "optim/grad_norm", "reward/mean"))
    assert 0 <= metrics["reward/mean"] <= 1

    trained = {k: p.detach() for k, p in transformer.named_parameters() if p.requires_grad}
    checkpoint = checkpoint_dir(tmp_path, 1)
    base = load_model(trainer.cfg, None, torch.device("cpu")).transformer.state_dict()
    assert base.keys() == expected.keys() and all(torch.equal(base[k], expected[k]) for k in expected)
    exported = export_checkpoint(checkpoint, tmp_path / "export")
    evaluated = dict(load_model(trainer.cfg, checkpoint, torch.device("cpu"), ema=False).transformer.named_parameters())
    if lora:
        assert (exported / "pytorch_lora_weights.safetensors").is_file()
        assert sum(".lora_B." in k for k in evaluated) == sum(".lora_B." in k for k in trained) > 0
        return
    written = type(transformer).from_pretrained(exported / "transformer").state_dict()
    assert written.keys() == trained.keys() == evaluated.keys()
    changed = [k for k in trained if not torch.equal(trained[k], expected[k])]
    assert changed  # the update moved the weights, and both commands read the moved ones
    assert all(torch.equal(written[k], trained[k]) and torch.equal(evaluated[k], trained[k]) for k in trained)


# ---- ZeRO-3 -------------------------------------------------------------------------------------


def _zero3_worker(folder: str, out: str) -> None:
    """In a forked child (one rank, gloo): the ZeRO-3 loader with `weights=False`, gathered and saved."""
    torch.set_num_threads(1)  # OpenMP's pool does not survive fork
    from megaflow.parallel.topology import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed

    from megaflow.parallel.engine import zero3_transformer_loader

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    config = json.loads((Path(folder) / "config.json").read_text())
    ds_config = {"train_micro_batch_size_per_gpu": 1,
                 "zero_optimization": {"stage": 3, "memory_efficient_linear": False}}
    model = zero3_transformer_loader(ds_config, weights=False, seed=7)(_model_cls(config), Path(folder), torch.bfloat16)
    params = list(model.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        state = {n: p.detach().clone() for n, p in params}
    torch.save({"params": state, "buffers": {n: b.clone() for n, b in model.named_buffers()}}, out)


def test_zero3_loader_without_weights_gives_the_random_loader_values(tmp_path):
    config = scaled_transformer_config("wan2.1_t2v_1.3b", SMALL)
    folder = _config_folder(tmp_path / "transformer", config)
    out = tmp_path / "zero3.pt"
    child = multiprocessing.get_context("fork").Process(target=_zero3_worker, args=(str(folder), str(out)))
    child.start()
    child.join(timeout=240)
    assert child.exitcode == 0
    got = torch.load(out, weights_only=True)
    plain = random_transformer_loader("cpu", seed=7)(_model_cls(config), folder, torch.bfloat16)
    expected = dict(plain.named_parameters())
    assert got["params"].keys() == expected.keys()
    for name, param in expected.items():
        assert got["params"][name].dtype == param.dtype and torch.equal(got["params"][name], param), name
    assert all(torch.equal(got["buffers"][n], b) for n, b in plain.named_buffers())
