"""CLIP-family rewards (pickscore, clipscore, hpsv2, aesthetic) on tiny folders loaded through the real
path, the HPS v2.1 open_clip -> CLIPModel converter, and the torch preprocessing against CLIPImageProcessor."""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

from megaflow.cli import main
from megaflow.errors import ConfigError
from megaflow.rewards import LAZY_REWARDS, available_rewards, build_reward
from megaflow.rewards.clip import (
    AESTHETIC_HEAD_FILES,
    TINY_CLIP,
    check_clip_state_dict,
    convert_hpsv2,
    openclip_key_targets,
    remap_openclip_state_dict,
    tiny_openclip_state_dict,
)
from megaflow.rewards.convert import CONVERTERS, convert_reward
from megaflow.rewards.preprocess import ImageSettings, preprocess_images, read_image_settings

DATA = Path(__file__).parent / "data"
IMAGES = Path(__file__).resolve().parents[2] / "megaflow" / "recipes" / "images"
PROMPTS = ["a red circle moving left", "a blue square moving up!"]
#: frames uniform:4 of a 5-frame video: round(i * 4 / 3) for i = 0..3
UNIFORM4_OF_5 = [0, 1, 3, 4]


pytestmark = pytest.mark.usefixtures("one_thread")


def videos(seed: int = 0, shape: tuple[int, ...] = (2, 5, 3, 24, 32)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def call(reward, vids: torch.Tensor, prompts: list[str] = PROMPTS) -> torch.Tensor:
    out = reward(vids, prompts, [{} for _ in prompts])
    assert out.shape == (vids.shape[0],) and out.dtype == torch.float32 and torch.isfinite(out).all()
    return out


def _pooled(out) -> torch.Tensor:
    """`get_*_features` output: a tensor (transformers 4) or an output with the projection in pooler_output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def direct_cosine(folder: Path, images: torch.Tensor, prompts: list[str]) -> tuple[CLIPModel, torch.Tensor]:
    """cos(image, text) computed straight from a freshly loaded CLIPModel (texts padded to 77, unlike the
    reward's longest-in-batch padding)."""
    model = CLIPModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    pixels = preprocess_images(images, read_image_settings(folder, TINY_CLIP["image_size"]))
    with torch.no_grad():
        img = _pooled(model.get_image_features(pixel_values=pixels))
        txt = _pooled(model.get_text_features(**tok(prompts, padding="max_length", max_length=77,
                                                    return_tensors="pt")))
    return model, F.cosine_similarity(img, txt, dim=-1)


def chosen_frames(vids: torch.Tensor, prompts: list[str], idx: list[int]) -> tuple[torch.Tensor, list[str]]:
    return vids[:, idx].flatten(0, 1), [p for p in prompts for _ in idx]


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------

def test_registered_lazily_with_converter():
    names = ("pickscore", "clipscore", "hpsv2", "aesthetic")
    assert set(names) <= set(available_rewards())
    assert all(LAZY_REWARDS[n] == "megaflow.rewards.clip" for n in names)
    assert CONVERTERS["hpsv2"] == "megaflow.rewards.clip:convert_hpsv2"


# ------------------------------------------------------------------------------------------------
# each reward's formula, from its tiny folder
# ------------------------------------------------------------------------------------------------

def test_pickscore_is_scaled_cosine_over_divisor(tiny_pickscore_dir):
    vids = videos(0)
    out = call(build_reward("pickscore", path=str(tiny_pickscore_dir)), vids)
    model, cos = direct_cosine(tiny_pickscore_dir, *chosen_frames(vids, PROMPTS, UNIFORM4_OF_5))
    scale = model.logit_scale.exp().item()
    assert scale == pytest.approx(100.0, rel=1e-5)
    expected = (scale * cos / 26.0).view(2, 4).mean(1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    raw = call(build_reward("pickscore", path=str(tiny_pickscore_dir), divisor=1), vids)
    torch.testing.assert_close(raw, 26.0 * out, atol=1e-4, rtol=1e-5)


def test_clipscore_is_clipped_weighted_cosine(tiny_clipscore_dir):
    vids = videos(1)
    out = call(build_reward("clipscore", path=str(tiny_clipscore_dir)), vids)
    _, cos = direct_cosine(tiny_clipscore_dir, *chosen_frames(vids, PROMPTS, UNIFORM4_OF_5))
    assert (cos < 0).any() and (cos > 0).any(), "the tiny model should give both signs, so the clamp is tested"
    torch.testing.assert_close(out, (2.5 * cos.clamp(min=0)).view(2, 4).mean(1), atol=1e-6, rtol=1e-5)
    w100 = call(build_reward("clipscore", path=str(tiny_clipscore_dir), w=100), vids)
    torch.testing.assert_close(w100, 40.0 * out, atol=1e-4, rtol=1e-5)


def test_aesthetic_is_affine_head_on_unit_embedding(tiny_aesthetic_dir):
    vids = videos(2)
    reward = build_reward("aesthetic", path=str(tiny_aesthetic_dir))
    out = call(reward, vids)
    # prompts are ignored
    torch.testing.assert_close(call(reward, vids, ["x", "something else entirely"]), out)
    # the head has no nonlinearity: compose its five linear layers into one affine map
    state = torch.load(tiny_aesthetic_dir / AESTHETIC_HEAD_FILES[0], map_location="cpu", weights_only=True)
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    a, c = torch.eye(TINY_CLIP["embed_dim"]), torch.zeros(TINY_CLIP["embed_dim"])
    for i in (0, 2, 4, 6, 7):
        a, c = state[f"layers.{i}.weight"] @ a, state[f"layers.{i}.weight"] @ c + state[f"layers.{i}.bias"]
    model = CLIPModel.from_pretrained(tiny_aesthetic_dir).eval()
    images, _ = chosen_frames(vids, PROMPTS, UNIFORM4_OF_5)
    with torch.no_grad():
        emb = F.normalize(_pooled(model.get_image_features(
            pixel_values=preprocess_images(images, read_image_settings(tiny_aesthetic_dir, 32)))), dim=-1)
    expected = (emb @ a.T + c).squeeze(-1).view(2, 4).mean(1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_aesthetic_reads_a_safetensors_head(tiny_aesthetic_dir, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "aesthetic"
    shutil.copytree(tiny_aesthetic_dir, folder)
    state = torch.load(folder / AESTHETIC_HEAD_FILES[0], map_location="cpu", weights_only=True)
    (folder / AESTHETIC_HEAD_FILES[0]).unlink()
    save_file(state, str(folder / "aesthetic_head.safetensors"))
    vids = videos(3)
    torch.testing.assert_close(call(build_reward("aesthetic", path=str(folder)), vids),
                               call(build_reward("aesthetic", path=str(tiny_aesthetic_dir)), vids))


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "hpsv2", "aesthetic"])
def test_frames_option_averages_the_chosen_frames(name, request):
    folder = request.getfixturevalue(f"tiny_{name}_dir")
    reward = build_reward(name, path=str(folder), frames="uniform:3", batch_size=3)
    assert reward.frames == "uniform:3"
    # frames 0, 2, 4 (the ones uniform:3 picks of 5) show one image per video; frames 1 and 3 are other noise
    vids = videos(4)
    image = videos(5, (2, 1, 3, 24, 32))
    vids[:, [0, 2, 4]] = image
    out = call(reward, vids)
    single = reward.score_images(image[:, 0], PROMPTS)
    torch.testing.assert_close(out, single.float(), atol=1e-5, rtol=1e-5)
    every = call(build_reward(name, path=str(folder), frames="all"), vids)
    assert (every - out).abs().max() > 1e-4, "frames: all must also score frames 1 and 3"


def test_bfloat16_scores_close_to_float32(tiny_hpsv2_dir):
    vids = videos(7)
    full = call(build_reward("hpsv2", path=str(tiny_hpsv2_dir)), vids)
    reward = build_reward("hpsv2", path=str(tiny_hpsv2_dir), dtype="bfloat16")
    assert next(reward.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(call(reward, vids), full, atol=0.03, rtol=0)


def test_tiny_folders_are_deterministic(tiny_clipscore_dir, tmp_path):
    from megaflow.rewards.clip import write_tiny_clipscore

    again = load_file(str(write_tiny_clipscore(tmp_path / "again") / "model.safetensors"))
    first = load_file(str(tiny_clipscore_dir / "model.safetensors"))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


# ------------------------------------------------------------------------------------------------
# HPS v2.1: converter and agreement with an open_clip forward written from the raw state dict
# ------------------------------------------------------------------------------------------------

def _ln(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)


def _resblock(x: torch.Tensor, sd: dict, p: str, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    """open_clip ResidualAttentionBlock: x + attn(ln_1 x); x + c_proj(gelu(c_fc(ln_2 x))) (nn.MultiheadAttention
    with packed in_proj [q; k; v])."""
    n, length, width = x.shape
    d = width // heads
    h = _ln(x, sd, p + "ln_1")
    q, k, v = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).split(width, dim=-1)
    q, k, v = (t.reshape(n, length, heads, d).transpose(1, 2) for t in (q, k, v))
    att = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        att = att + mask
    o = (att.softmax(-1) @ v).transpose(1, 2).reshape(n, length, width)
    x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = F.gelu(_ln(x, sd, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
    return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def openclip_hps_score(sd: dict, pixels: torch.Tensor, tokens: torch.Tensor, heads: int, layers: int) -> torch.Tensor:
    """HPS = cos(encode_image, encode_text) of an open_clip ViT CLIP, from its state dict."""
    patch = sd["visual.conv1.weight"].shape[-1]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre")
    for i in range(layers):
        x = _resblock(x, sd, f"visual.transformer.resblocks.{i}.", heads, None)
    image = _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]
    length = tokens.shape[1]
    t = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][:length]
    causal = torch.full((length, length), float("-inf")).triu(1)
    for i in range(layers):
        t = _resblock(t, sd, f"transformer.resblocks.{i}.", heads, causal)
    t = _ln(t, sd, "ln_final")
    text = t[torch.arange(len(tokens)), tokens.argmax(-1)] @ sd["text_projection"]  # EOT has the largest id
    return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)


def test_hpsv2_matches_the_openclip_computation(tiny_hpsv2_dir):
    sd = torch.load(tiny_hpsv2_dir.parent / "HPS_tiny.pt", map_location="cpu", weights_only=True)["state_dict"]
    reward = build_reward("hpsv2", path=str(tiny_hpsv2_dir))
    assert reward.model.config.text_config.hidden_act == "gelu" == reward.model.config.vision_config.hidden_act
    images = videos(6, (6, 3, 24, 32))
    prompts = PROMPTS + ["", "an extremely long prompt " * 12, "ÉÀ ünïcode ✓", "a"]
    ours = reward.score_images(images, prompts)
    # open_clip's tokenizer: [SOT] tokens [EOT] padded with 0 to 77, truncated keeping EOT last
    tok = AutoTokenizer.from_pretrained(tiny_hpsv2_dir)
    tokens = torch.zeros(len(prompts), 77, dtype=torch.long)
    for row, ids in enumerate(tok(prompts, truncation=True, max_length=77)["input_ids"]):
        tokens[row, :len(ids)] = torch.tensor(ids)
    pixels = preprocess_images(images, reward.settings)
    with torch.no_grad():
        ref = openclip_hps_score(sd, pixels, tokens, TINY_CLIP["heads"], TINY_CLIP["layers"])
    assert ref.abs().max() > 0.05  # not a degenerate model
    # measured: max |difference| 1.1e-7 (float32; scores -0.15 .. 0.33)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)


def _real_keys() -> dict[str, tuple[int, ...]]:
    lines = (DATA / "hpsv2_vit_h14_openclip_keys.txt").read_text().splitlines()
    return {k: tuple(json.loads(s)) for k, s in (ln.split("\t") for ln in lines if ln and not ln.startswith("#"))}


def _vit_h14_config() -> CLIPConfig:
    """transformers' CLIP ViT-H-14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K) sizes."""
    return CLIPConfig(
        projection_dim=1024,
        text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="gelu"))


def test_every_real_vit_h14_key_maps_onto_clipmodel():
    real = _real_keys()
    # open_clip ViT-H-14: 8 visual + 32x12 visual blocks + 5 text + 24x12 text blocks + logit_scale
    assert len(real) == 8 + 32 * 12 + 5 + 24 * 12 + 1 == 686
    unmapped = [k for k in real if openclip_key_targets(k) is None]
    assert unmapped == []
    # shapes and names, against CLIPModel(ViT-H-14) on the meta device: nothing missing, extra or misshapen
    meta = {k: torch.empty(s, device="meta") for k, s in real.items()}
    check_clip_state_dict(remap_openclip_state_dict(meta), _vit_h14_config())
    # the tiny checkpoint has the same layout, up to the number of blocks
    def pattern(keys):
        return {re.sub(r"\.resblocks\.\d+\.", ".resblocks.N.", k) for k in keys}
    assert pattern(tiny_openclip_state_dict()) == pattern(real)


def _tiny_checkpoint(tmp_path: Path, change) -> Path:
    sd = tiny_openclip_state_dict()
    change(sd)
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": sd}, path)
    return path


@pytest.mark.parametrize("change, match", [
    (lambda sd: sd.pop("visual.ln_post.bias"), r"1 missing model parameter\(s\): vision_model\.post_layernorm\.bias"),
    (lambda sd: sd.update({"visual.attnpool.query": torch.zeros(3)}),
     r"no CLIPModel counterpart: visual\.attnpool\.query"),
    (lambda sd: sd.update({"token_embedding.weight": torch.zeros(500, 32)}),
     r"shape mismatch.*token_embedding\.weight \[500, 32\] vs \[514, 32\]"),
    (lambda sd: sd.update({"args": argparse.Namespace(lr=1)}), r"weights_only"),
], ids=["missing-key", "unmapped-key", "shape-mismatch", "pickled-object"])
def test_converter_rejects_bad_checkpoints(tiny_hpsv2_dir, tmp_path, change, match):
    ckpt = _tiny_checkpoint(tmp_path, change)
    dst = tmp_path / "out"
    with pytest.raises(ConfigError, match=match):
        convert_reward("hpsv2", ckpt, dst, tiny_hpsv2_dir.parent / "base")
    assert not dst.exists()  # nothing written


def test_converter_needs_an_empty_destination_and_a_base(tiny_hpsv2_dir, tmp_path):
    ckpt, base = tiny_hpsv2_dir.parent / "HPS_tiny.pt", tiny_hpsv2_dir.parent / "base"
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    with pytest.raises(ConfigError, match="is not empty"):
        convert_reward("hpsv2", ckpt, full, base)
    with pytest.raises(ConfigError, match="is not an empty folder"):
        convert_hpsv2(ckpt, full, base)
    with pytest.raises(ConfigError, match="needs --base"):
        convert_reward("hpsv2", ckpt, tmp_path / "new")
    with pytest.raises(ConfigError, match="has no config.json"):
        convert_reward("hpsv2", ckpt, tmp_path / "new", tmp_path)


def test_convert_reward_cli(tiny_hpsv2_dir, tmp_path, capsys):
    dst = tmp_path / "hps"
    argv = ["convert-reward", "hpsv2", str(tiny_hpsv2_dir.parent / "HPS_tiny.pt"), str(dst),
            "--base", str(tiny_hpsv2_dir.parent / "base")]
    assert main(argv) == 0
    assert "use it as reward.options.hpsv2.path" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in dst.iterdir()}
    ours, fixture = load_file(str(dst / "model.safetensors")), load_file(str(tiny_hpsv2_dir / "model.safetensors"))
    assert ours.keys() == fixture.keys() and all(torch.equal(ours[k], fixture[k]) for k in ours)
    assert main(argv) == 2  # the destination is not empty any more
    assert "is not empty" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# preprocessing: torch path vs transformers' CLIPImageProcessor (PIL), at the real 224 size
# ------------------------------------------------------------------------------------------------

def _processor_gap(image: Image.Image) -> float:
    """max |preprocess_images − CLIPImageProcessor| in normalised units on one uint8 RGB image at 224."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    ref = cls(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})(
        images=image, return_tensors="np")["pixel_values"]
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    ours = preprocess_images(pixels, ImageSettings(224, (224, 224)))
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    return (ours - torch.from_numpy(np.asarray(ref))).abs().max().item()


def test_preprocessing_is_close_to_clip_image_processor():
    from megaflow.demo.world import Attributes, render_clip

    # a shipped 32x32 recipe image, upscaled to 224 (bicubic both; PIL rounds to uint8 after resizing):
    # measured max 0.077 normalised units (yellow_triangle; about 0.02 in [0, 1] pixel units)
    for name in ("red_circle", "yellow_triangle"):
        assert _processor_gap(Image.open(IMAGES / f"{name}.png").convert("RGB")) < 0.1
    # a shapes-world frame at Wan's 480x832, downscaled to 224x388 and centre-cropped (antialiased bicubic both):
    # measured max 0.011 normalised units
    frame = render_clip(Attributes("red", "circle", "left"), seed=0, frames=1, height=480, width=832)[0]
    u8 = (frame.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert _processor_gap(Image.fromarray(u8)) < 0.02


# ------------------------------------------------------------------------------------------------
# bad options and folders
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, options, match", [
    ("pickscore", {}, r"needs option path.*PickScore_v1"),
    ("clipscore", {"path": "/nonexistent/clip"}, r"'/nonexistent/clip' is not a folder.*hf download"),
    ("hpsv2", {"dtype": "float64"}, r"dtype must be one of float32, bfloat16, float16, got 'float64'"),
    ("aesthetic", {"frames": "uniform:0"}, r"option frames must be one of .*got 'uniform:0'"),
    ("pickscore", {"frames": "middle3"}, r"option frames"),
    ("pickscore", {"divisor": 0}, r"option divisor must be a positive finite number"),
    ("clipscore", {"w": "abc"}, r"option w must be a number"),
    ("hpsv2", {"batch_size": 0}, r"batch_size must be a positive integer"),
    ("aesthetic", {"prompt": "x"}, r"unexpected option\(s\) prompt"),
])
def test_bad_options_are_config_errors(name, options, match):
    with pytest.raises(ConfigError, match=match):
        build_reward(name, **options)


def test_wrong_folders_say_what_is_wrong(tmp_path, tiny_clipscore_dir, tiny_pickscore_dir):
    with pytest.raises(ConfigError, match=r"has no config.json.*convert-reward hpsv2"):
        build_reward("hpsv2", path=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip"}))
    with pytest.raises(ConfigError, match=r"model_type 'blip', not a CLIP model"):
        build_reward("clipscore", path=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ConfigError, match=r"has no weights"):
        build_reward("clipscore", path=str(tmp_path))
    no_head = tmp_path / "no_head"
    shutil.copytree(tiny_clipscore_dir, no_head)
    with pytest.raises(ConfigError, match=r"has no aesthetic head.*sac\+logos\+ava1-l14-linearMSE.pth"):
        build_reward("aesthetic", path=str(no_head))
    # a head that is not a plain state dict is refused by weights_only loading
    torch.save({"head": argparse.Namespace(a=1)}, no_head / AESTHETIC_HEAD_FILES[0])
    with pytest.raises(ConfigError, match=r"cannot use .* as the LAION aesthetic head"):
        build_reward("aesthetic", path=str(no_head))
    no_tok = tmp_path / "no_tok"
    shutil.copytree(tiny_pickscore_dir, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"has no CLIP tokenizer"):
        build_reward("pickscore", path=str(no_tok))
    # weights of another shape: a load error naming the folder
    config = json.loads((no_tok / "config.json").read_text())
    config["projection_dim"] = 8
    (no_head / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"cannot load the CLIP model"):
        build_reward("clipscore", path=str(no_head))
