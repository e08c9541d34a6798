"""ImageReward on transformers: the converted tiny model equals a plain-torch forward of the raw
checkpoint, the published key layout converts completely, preprocessing stays close to the
reference processors, and bad input fails with a message naming the problem."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megaflow.errors import ConfigError
from megaflow.rewards import RewardSet, build_reward
from megaflow.rewards.convert import convert_reward
from megaflow.rewards.frames import sample_frames
from megaflow.rewards.imagereward import (
    DROPPED_KEYS,
    HEAD_FILE,
    REWARD_MEAN,
    REWARD_STD,
    checkpoint_name,
    convert_imagereward,
    map_checkpoint_key,
    plan_conversion,
    tiny_checkpoint_keys,
)
from megaflow.rewards.preprocess import read_image_settings

DATA = Path(__file__).parent / "data"
RECIPE_IMAGE = Path(__file__).parents[2] / "megaflow" / "recipes" / "images" / "yellow_triangle.png"
PROMPTS = ["a red circle moving left", "a blue square moving up next to a photo of a dog"]
#: ImageReward's published constants, written out here on purpose (not imported).
MEAN, STD = 0.16717362830052426, 1.0333394966054072
FOLDER_FILES = {"config.json", "model.safetensors", HEAD_FILE, "imagereward.json", "preprocessor_config.json",
                "tokenizer.json", "tokenizer_config.json"}


def videos(batch: int = 2, frames: int = 5, height: int = 24, width: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, frames, 3, height, width, generator=g)


def real_keys() -> dict[str, tuple[int, ...]]:
    """The published ImageReward.pt's keys and shapes (tests/rewards/data/imagereward_keys.txt)."""
    shapes = {}
    for line in (DATA / "imagereward_keys.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, dims = line.split()
            shapes[name] = tuple(int(d) for d in dims.split(","))
    return shapes


def meta_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta", dtype=torch.int64 if k.endswith("position_ids") else torch.float32)
            for k, s in shapes.items()}


@pytest.fixture(scope="module")
def reward(tiny_imagereward_dir: Path):
    return build_reward("imagereward", path=str(tiny_imagereward_dir))


@pytest.fixture(scope="module")
def raw(tiny_imagereward_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(tiny_imagereward_dir.parent / "ImageReward.pt", map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- reference forward
# BLIP's ViT and med.py BERT written out from the raw ImageReward.pt keys, in plain torch.
def _ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])


def _split(x, heads):
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def ref_vit(sd, pixels, heads):
    v = "blip.visual_encoder."
    w = sd[v + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, w, sd[v + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[v + "pos_embed"]
    i = 0
    while f"{v}blocks.{i}.norm1.weight" in sd:
        p = f"{v}blocks.{i}."
        h = _ln(x, sd, p + "norm1", 1e-6)
        b, n, c = h.shape
        q, k, val = _lin(h, sd, p + "attn.qkv").view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
        x = x + _lin((att @ val).transpose(1, 2).reshape(b, n, c), sd, p + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, p + "norm2", 1e-6), sd, p + "mlp.fc1")), sd, p + "mlp.fc2")
        i += 1
    return _ln(x, sd, v + "norm", 1e-6)


def _ref_attention(sd, p, h, ctx, mask, heads):
    q, k, val = (_split(_lin(t, sd, f"{p}.self.{n}"), heads) for t, n in ((h, "query"), (ctx, "key"), (ctx, "value")))
    scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5) + mask
    out = (scores.softmax(-1) @ val).transpose(1, 2).reshape(h.shape)
    return _ln(_lin(out, sd, p + ".output.dense") + h, sd, p + ".output.LayerNorm", 1e-12)


def ref_text_cls(sd, ids, mask, image_embeds, heads):
    t = "blip.text_encoder."
    positions = sd[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = sd[t + "embeddings.word_embeddings.weight"][ids] + positions
    x = _ln(x, sd, t + "embeddings.LayerNorm", 1e-12)
    self_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended mask
    i = 0
    while f"{t}encoder.layer.{i}.attention.self.query.weight" in sd:
        p = f"{t}encoder.layer.{i}."
        x = _ref_attention(sd, p + "attention", x, x, self_mask, heads)
        x = _ref_attention(sd, p + "crossattention", x, image_embeds, 0.0, heads)  # all image tokens visible
        ffn = _lin(F.gelu(_lin(x, sd, p + "intermediate.dense")), sd, p + "output.dense")
        x = _ln(ffn + x, sd, p + "output.LayerNorm", 1e-12)
        i += 1
    return x[:, 0]


def ref_raw(sd, pixels, ids, mask, vision_heads=2, text_heads=2):
    """ImageReward's raw head output: the tiny model has 2 ViT heads (128 wide) and 2 BERT heads."""
    f = ref_text_cls(sd, ids, mask, ref_vit(sd, pixels, vision_heads), text_heads)
    for i in (0, 2, 4, 6, 7):  # the head's linears; 1, 3, 5 are dropouts, there are no activations
        f = _lin(f, sd, f"mlp.layers.{i}")
    return f.squeeze(-1)


def ref_tokens(base: Path, prompts: list[str]):
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(base))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    enc = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    return tok, enc["input_ids"], enc["attention_mask"]


# --------------------------------------------------------------------------- scoring
def test_scores_equal_reference_forward(reward, raw, tiny_imagereward_dir: Path) -> None:
    """Real loading path on [2, 5, 3, 24, 32] videos: scores [2] equal the plain-torch forward of
    the raw checkpoint, standardised with ImageReward's constants, averaged over uniform:4 frames."""
    from megaflow.rewards.preprocess import preprocess_images

    vids = videos()
    scores = reward(vids, PROMPTS, [{}, {}])
    assert scores.shape == (2,) and scores.dtype == torch.float32

    frames = sample_frames(vids, "uniform:4")  # frames 0, 1, 3, 4
    b, k = frames.shape[:2]
    pixels = preprocess_images(frames.flatten(0, 1), read_image_settings(tiny_imagereward_dir, 224))
    assert pixels.shape == (b * k, 3, 32, 32)
    _, ids, mask = ref_tokens(tiny_imagereward_dir.parent / "base", [p for p in PROMPTS for _ in range(k)])
    with torch.no_grad():
        expected_raw = ref_raw(raw, pixels, ids, mask)
    expected = ((expected_raw - MEAN) / STD).view(b, k).mean(1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)

    # the standardisation: per image, score = (raw − 0.16717…) / 1.03333…
    with torch.no_grad():
        images = frames.flatten(0, 1)
        texts = [p for p in PROMPTS for _ in range(k)]
        got_raw = reward.raw_scores(images, texts)
        torch.testing.assert_close(got_raw, expected_raw, atol=1e-5, rtol=0)
        torch.testing.assert_close(reward.score_images(images, texts), (got_raw - MEAN) / STD, atol=1e-6, rtol=0)
    assert (REWARD_MEAN, REWARD_STD) == (MEAN, STD)
    # the comparison is not vacuous: prompt and image both move the score
    swapped = reward(vids, PROMPTS[::-1], [{}, {}])
    assert (swapped - scores).abs().min() > 1e-3
    assert (scores[0] - scores[1]).abs() > 1e-3


def test_text_input_is_imagereward_s(reward, tiny_imagereward_dir: Path) -> None:
    """35 tokens, [CLS] first (not replaced by [ENC]), truncated with [SEP] last, [DEC]/[ENC] added."""
    long_prompt = " ".join(["red circle"] * 40)
    enc = reward.encode_text(["a red circle", long_prompt])
    tok, ids, mask = ref_tokens(tiny_imagereward_dir.parent / "base", ["a red circle", long_prompt])
    assert torch.equal(enc["input_ids"].cpu(), ids) and torch.equal(enc["attention_mask"].cpu(), mask)
    assert ids.shape == (2, 35)
    assert (ids[:, 0] == tok.cls_token_id).all()
    assert ids[1, -1] == tok.sep_token_id and mask[1].all()
    assert mask[0].sum() == 5 and (ids[0, 5:] == tok.pad_token_id).all()
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(tok) - 2, len(tok) - 1]
    assert len(reward.tokenizer) == len(tok)


def test_towers_use_blip_s_layer_norm_eps_and_exact_gelu(reward) -> None:
    """What the tiny comparison cannot see (eps is far below its LayerNorm inputs' variance): the
    loaded ViT uses timm's eps 1e-6 (not transformers' default 1e-5), the BERT 1e-12, both erf GELU."""
    from torch import nn

    assert {m.eps for m in reward.vision.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}
    assert {m.eps for m in reward.text.modules() if isinstance(m, nn.LayerNorm)} == {1e-12}
    assert reward.vision.config.hidden_act == reward.text.config.hidden_act == "gelu"


def test_batching_and_reward_set(reward, tiny_imagereward_dir: Path) -> None:
    """Same scores with a small batch size, built lazily by name through a RewardSet; bfloat16 close."""
    vids = videos(batch=3, frames=4, seed=1)
    prompts = PROMPTS + ["a green triangle"]
    expected = reward(vids, prompts, [{}] * 3)
    rs = RewardSet({"imagereward": 1.0}, {"imagereward": {"path": str(tiny_imagereward_dir), "batch_size": 5}})
    torch.testing.assert_close(rs(vids, prompts, [{}] * 3)["imagereward"], expected, atol=1e-5, rtol=0)
    half = build_reward("imagereward", path=str(tiny_imagereward_dir), dtype="bfloat16")
    # bfloat16 towers, float32 head: measured max diff 0.0078 on these scores
    torch.testing.assert_close(half(vids, prompts, [{}] * 3), expected, atol=0.05, rtol=0)


# --------------------------------------------------------------------------- preprocessing
def _frame(height: int, width: int) -> np.ndarray:
    """A frame of the shapes world rendered at `height`×`width`, as uint8 HWC."""
    from megaflow.demo.world import Attributes, render_clip

    clip = render_clip(Attributes("yellow", "triangle", "left"), seed=3, frames=1, height=height, width=width)
    return (clip[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _ours(frame: np.ndarray, tmp_path: Path) -> torch.Tensor:
    from megaflow.rewards.imagereward import _preprocessor_config
    from megaflow.rewards.preprocess import preprocess_images

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(224)))
    settings = read_image_settings(tmp_path, 224)
    assert settings.size == 224 and settings.crop == (224, 224) and not settings.square
    return preprocess_images(torch.tensor(frame).permute(2, 0, 1)[None].float() / 255, settings)[0]


def test_preprocessing_close_to_reference_processors(tmp_path: Path) -> None:
    """Torch bicubic-antialias preprocessing vs transformers' PIL processors at 224 on real frames
    (differences in normalised units; ×0.27 for [0, 1] pixel units)."""
    from PIL import Image
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    clip_stats = dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    blip = BlipImageProcessorPil(size={"height": 224, "width": 224}, resample=3, **clip_stats)

    def diff(frame: np.ndarray, processor) -> torch.Tensor:
        ref = processor(Image.fromarray(frame), return_tensors="np")["pixel_values"][0]
        return (_ours(frame, tmp_path) - torch.tensor(np.asarray(ref))).abs()

    # square frames: BLIP's processor (resize to 224×224, bicubic) = ImageReward's Resize(224) + CenterCrop(224)
    d = diff(_frame(320, 320), blip)  # a shapes-world frame, downscaled
    assert d.max() < 0.05 and d.mean() < 1e-4, (float(d.max()), float(d.mean()))  # measured: max 0.029, mean 7.2e-6
    recipe = np.asarray(Image.open(RECIPE_IMAGE).convert("RGB"))  # 32×32, upscaled
    d = diff(recipe, blip)
    assert d.max() < 0.1 and d.mean() < 2e-3, (float(d.max()), float(d.mean()))  # measured: max 0.077, mean 4.3e-4

    # a non-square frame: ImageReward keeps the aspect (shortest side to 224, centre crop), which is
    # CLIP's processor, not BLIP's (that one warps the frame to a square)
    clip = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                                 **clip_stats)
    d = diff(_frame(288, 512), clip)
    assert d.max() < 0.03 and d.mean() < 1e-4, (float(d.max()), float(d.mean()))  # measured: max 0.013, mean 8.1e-6


# --------------------------------------------------------------------------- converter
def test_published_keys_all_map_or_are_dropped() -> None:
    """Every key of the published ImageReward.pt maps to the model or the head, or is listed as dropped."""
    shapes = real_keys()
    assert len(shapes) == 625
    where = {k: map_checkpoint_key(k) for k in shapes}
    assert [k for k, w in where.items() if w is None] == []
    assert {k for k, w in where.items() if w[0] == "dropped"} == {"blip.text_encoder.embeddings.position_ids"}
    assert sum(w[0] == "head" for w in where.values()) == 10
    for key, w in where.items():  # the error messages name checkpoint keys: the reverse map is exact
        if w[0] == "model":
            assert checkpoint_name(w[1]) == key
    assert all(re.compile(p) for p in DROPPED_KEYS)


def test_published_keys_fill_the_transformers_model() -> None:
    """The published key list, as meta tensors, fills BlipForImageTextRetrieval exactly (ViT-L/16 at
    224, BERT-base with cross-attention), with only the unused ITM head zero-filled."""
    plan = plan_conversion(meta_state(real_keys()), None)
    v, t = plan.config.vision_config, plan.config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1024, 24, 16, 4096)
    assert (v.image_size, v.patch_size, v.layer_norm_eps, v.hidden_act) == (224, 16, 1e-6, "gelu")
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (768, 12, 12, 3072)
    assert (t.vocab_size, t.max_position_embeddings, t.encoder_hidden_size) == (30524, 512, 1024)
    assert t.layer_norm_eps == 1e-12
    assert t.is_decoder  # makes transformers build the cross-attention layers
    assert plan.filled == ["itm_head.weight", "itm_head.bias"]
    assert plan.head_dims == [768, 1024, 128, 64, 16, 1]
    assert len(plan.model) == 625 - 1 - 10 + 2


def test_base_config_names_the_head_counts(tmp_path: Path) -> None:
    """Head counts are the one thing shapes do not tell: from --base's BERT or BLIP config, else width/64."""
    from megaflow.rewards.imagereward import blip_config_from_checkpoint

    state = meta_state(real_keys())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768,
                                                      "num_attention_heads": 12}))
    cfg = blip_config_from_checkpoint(state, tmp_path)
    assert (cfg.vision_config.num_attention_heads, cfg.text_config.num_attention_heads) == (16, 12)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip", "vision_config": {"num_attention_heads": 8},
                                                      "text_config": {"num_attention_heads": 6}}))
    cfg = blip_config_from_checkpoint(state, tmp_path)
    assert (cfg.vision_config.num_attention_heads, cfg.text_config.num_attention_heads) == (8, 6)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 1024,
                                                      "num_attention_heads": 16}))
    with pytest.raises(ConfigError, match="BERT 1024 wide, the checkpoint's is 768 wide"):
        blip_config_from_checkpoint(state, tmp_path)


def test_tiny_checkpoint_has_the_published_layout() -> None:
    """The tiny checkpoint's keys are the published ones with fewer layers."""
    def layout(keys):
        return {re.sub(r"\.(blocks|layer)\.\d+\.", r".\1.N.", k) for k in keys}

    assert layout(tiny_checkpoint_keys()) == layout(real_keys())


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


def test_converter_errors_name_the_problem(raw, tiny_imagereward_dir: Path, tmp_path: Path) -> None:
    base = tiny_imagereward_dir.parent / "base"
    extra = dict(raw, **{"blip.text_encoder.encoder.layer.0.attention.self.rotary.weight": torch.zeros(2)})
    with pytest.raises(ConfigError, match=r"blip\.text_encoder\.encoder\.layer\.0\.attention\.self\.rotary\.weight"):
        convert_imagereward(_save(extra, tmp_path / "extra.pt"), tmp_path / "a", base)
    missing = {k: v for k, v in raw.items() if k != "blip.visual_encoder.blocks.1.attn.qkv.weight"}
    with pytest.raises(ConfigError, match=r"lacks 1 weight.*blip\.visual_encoder\.blocks\.1\.attn\.qkv\.weight"):
        convert_imagereward(_save(missing, tmp_path / "missing.pt"), tmp_path / "b", base)
    wrong = dict(raw, **{"mlp.layers.4.weight": torch.zeros(3, 24)})
    with pytest.raises(ConfigError, match="head"):
        convert_imagereward(_save(wrong, tmp_path / "wrong.pt"), tmp_path / "c", base)
    with pytest.raises(ConfigError, match="needs --base.*bert-base-uncased"):
        convert_imagereward(tiny_imagereward_dir.parent / "ImageReward.pt", tmp_path / "d", None)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        convert_imagereward(junk, tmp_path / "e", base)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    for convert in (convert_imagereward, lambda s, d, b: convert_reward("imagereward", s, d, b)):
        with pytest.raises(ConfigError, match="is not empty"):
            convert(tiny_imagereward_dir.parent / "ImageReward.pt", tmp_path / "full", base)


def test_cli_converts_a_loadable_folder(reward, raw, tiny_imagereward_dir: Path, tmp_path: Path) -> None:
    """`megaflow convert-reward imagereward SRC DST --base BASE`, from a DDP-prefixed save too."""
    from megaflow.cli import main

    src = _save({f"module.{k}": v for k, v in raw.items()}, tmp_path / "ImageReward.pt")
    dst = tmp_path / "out"
    assert main(["convert-reward", "imagereward", str(src), str(dst), "--base",
                 str(tiny_imagereward_dir.parent / "base")]) == 0
    assert {p.name for p in dst.iterdir()} == FOLDER_FILES
    assert json.loads((dst / "imagereward.json").read_text())["dropped"] == {
        "blip.text_encoder.embeddings.position_ids": DROPPED_KEYS[r"blip\.text_encoder\.embeddings\.position_ids"]}
    vids = videos(batch=2, frames=2, seed=2)
    again = build_reward("imagereward", path=str(dst), frames="all")(vids, PROMPTS, [{}, {}])
    torch.testing.assert_close(again, build_reward("imagereward", path=str(tiny_imagereward_dir), frames="all")(
        vids, PROMPTS, [{}, {}]), atol=0, rtol=0)


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize("options, message", [
    ({}, "needs option path"),
    ({"path": "/nonexistent/imagereward"}, "is not a folder"),
    ({"path": "EMPTY"}, r"not a converted ImageReward folder \(no config.json, model.safetensors, "
                        r"imagereward_head.safetensors\).*convert-reward imagereward"),
    ({"path": "TINY", "frames": "uniform:0"}, "frames must be one of"),
    ({"path": "TINY", "dtype": "float64"}, "dtype must be one of"),
    ({"path": "TINY", "batch_size": 0}, "batch_size must be a positive integer"),
    ({"path": "TINY", "size": 224}, "unexpected option.*size"),
])
def test_bad_options_are_config_errors(options, message, tiny_imagereward_dir: Path, tmp_path: Path) -> None:
    paths = {"EMPTY": str(tmp_path), "TINY": str(tiny_imagereward_dir)}
    options = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(ConfigError, match=message):
        build_reward("imagereward", **options)
