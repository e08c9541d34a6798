"""VideoAlign / VideoReward from tiny folders in the real layouts: scores, normalisation, sharing
one model and one forward, the LoRA merge, frame sampling and patches, errors."""
from __future__ import annotations

import copy
import functools
import json
import math
import shutil

import numpy as np
import pytest
import torch

from megaflow.demo.world import Attributes, render_clip
from megaflow.errors import ConfigError
from megaflow.rewards import RewardSet, available_rewards, build_reward
from megaflow.rewards import videoalign as va

PROMPTS = ["a red circle moving left", "a blue square moving up"]


@functools.lru_cache(maxsize=None)
def _clips() -> torch.Tensor:
    return torch.stack([render_clip(Attributes("red", "circle", "left"), 0, 0, 9, 56, 56),
                        render_clip(Attributes("blue", "square", "up"), 0, 1, 9, 56, 56)])


def videos() -> torch.Tensor:
    """Two rendered shapes-world clips `[2, 9, 3, 56, 56]` (a new tensor each call)."""
    return _clips().clone()


@pytest.fixture(scope="module")
def published(tiny_videoalign_dirs):
    """Options for the published-layout tiny checkpoint; frames kept at 56×56 (min_pixels) so the
    tests run fast (the default budget upscales them to 336×336: see test_scores_at_default_budget)."""
    path, base = tiny_videoalign_dirs["published"]
    return {"path": str(path), "base": str(base), "min_pixels": 56 * 56}


def test_registered():
    assert {"videoalign", "videoalign_vq", "videoalign_mq", "videoalign_ta"} <= set(available_rewards())


def test_scores_and_normalisation(published):
    reward = build_reward("videoalign", **published)
    x = videos()
    out = reward(x, PROMPTS, [{}, {}])
    assert set(out) == {"score", "vq", "mq", "ta"}
    for value in out.values():
        assert value.shape == (2,) and value.dtype == torch.float32 and torch.isfinite(value).all()
    torch.testing.assert_close(out["score"], out["vq"] + out["mq"] + out["ta"])
    # an unnormalised recomputation (a fresh forward, no memo), normalised by inference_config
    raw = reward.shared._forward(x, PROMPTS, reward.template, reward.sampling)
    stats = va.TINY_STATS
    for i, dim in enumerate(va.DIMENSIONS):
        expected = (raw[:, i] - stats[f"{dim.upper()}_mean"]) / stats[f"{dim.upper()}_std"]
        torch.testing.assert_close(out[dim], expected)
    plain = build_reward("videoalign", normalize=False, **published)(x, PROMPTS, [{}, {}])
    torch.testing.assert_close(plain["vq"], raw[:, 0])
    for output in va.DIMENSIONS:
        single = build_reward("videoalign", output=output, **published)(x, PROMPTS, [{}, {}])
        torch.testing.assert_close(single["score"], out[output])


def test_scores_at_default_budget(tiny_videoalign_dirs):
    path, base = tiny_videoalign_dirs["published"]
    reward = build_reward("videoalign_ta", path=str(path), base=str(base))
    assert (reward.sampling.fps, reward.sampling.max_pixels, reward.sampling.min_pixels) == (2.0, 200704, 100352)
    out = reward(videos(), PROMPTS, [{}, {}])
    assert out["score"].shape == (2,) and torch.isfinite(out["score"]).all()
    torch.testing.assert_close(out["score"], out["ta"])


def test_variants_share_one_model_and_one_forward(published):
    va.clear_cache()
    loads = va.VideoAlignModel.loads
    rewards = RewardSet({"videoalign_vq": 1.0, "videoalign_mq": 0.5, "videoalign": 0.1},
                        {"videoalign_vq": published, "videoalign_mq": published, "videoalign": published})
    assert va.VideoAlignModel.loads == loads + 1
    shared = {id(r.shared) for r in rewards.rewards.values()}
    assert len(shared) == 1
    model = rewards.rewards["videoalign_vq"].shared
    forwards = model.forwards
    x = videos()
    result = rewards.score(x, PROMPTS, [{}, {}])
    assert model.forwards == forwards + 1
    torch.testing.assert_close(result.components["videoalign_vq"], result.details["videoalign_mq/vq"])
    torch.testing.assert_close(result.components["videoalign_mq"], result.details["videoalign_vq/mq"])
    assert {"videoalign_vq/ta", "videoalign/ta"} <= set(result.details)
    rewards.score(x.clone(), PROMPTS, [{}, {}])  # a new tensor: a new forward
    assert model.forwards == forwards + 2
    with pytest.raises(ConfigError, match="unexpected option"):
        build_reward("videoalign_vq", output="ta", **published)


def test_layouts_give_the_same_scores(tiny_videoalign_dirs, published):
    path, base = tiny_videoalign_dirs["adapter"]
    x = videos()
    a = build_reward("videoalign", path=str(path), base=str(base), min_pixels=56 * 56)(x, PROMPTS, [{}, {}])
    b = build_reward("videoalign", **published)(x, PROMPTS, [{}, {}])
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_lora_matches_unmerged_layer(rslora):
    g = torch.Generator().manual_seed(1)
    w, a, b, x = (torch.randn(*s, generator=g) for s in ((6, 5), (2, 5), (6, 2), (3, 5)))
    merged = va.merge_lora({"layer.weight": w.clone()}, {"layer": {"A": a, "B": b}},
                           va.LoraSettings(r=2, alpha=8.0, use_rslora=rslora))["layer.weight"]
    scale = 8.0 / math.sqrt(2) if rslora else 8.0 / 2
    torch.testing.assert_close(x @ merged.T, x @ w.T + scale * (x @ a.T @ b.T))


def test_merged_model_matches_unmerged_lora(tiny_videoalign_dirs, published):
    """The loaded model (LoRA merged, built without init) against Qwen2VLModel built the usual way
    with the checkpoint's unmerged LoRA added by forward hooks (`out + s·x@Aᵀ@Bᵀ`, s = alpha/r)."""
    from transformers import Qwen2VLConfig, Qwen2VLModel

    path, base = tiny_videoalign_dirs["published"]
    reward = build_reward("videoalign", **published)
    state = torch.load(next(path.glob("checkpoint-*")) / "model.pth", map_location="cpu", weights_only=True)
    weights, loras = va.split_peft(state)
    weights.pop("rm_head.weight")
    assert len(loras) == 14 and all(m.startswith("language_model.layers.") for m in loras)
    reference = Qwen2VLModel(Qwen2VLConfig.from_pretrained(base))
    rows, hidden = weights["language_model.embed_tokens.weight"].shape
    reference.language_model.embed_tokens = torch.nn.Embedding(rows, hidden)
    reference.load_state_dict(weights, strict=True)
    settings = json.loads((path / "model_config.json").read_text())["peft_lora_config"]
    scale = settings["lora_alpha"] / settings["lora_r"]
    for module, ab in loras.items():
        reference.get_submodule(module).register_forward_hook(
            lambda mod, inp, out, a=ab["A"], b=ab["B"]: out + scale * (inp[0] @ a.T @ b.T))
    unmerged = copy.copy(reward.shared)
    unmerged.model = reference.eval()
    x = videos()
    with torch.no_grad():
        got = reward.shared._forward(x, PROMPTS, reward.template, reward.sampling)
        want = unmerged._forward(x, PROMPTS, reward.template, reward.sampling)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    q = "language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(weights[q], reward.shared.model.get_parameter(q))  # the merge changed it


def test_patchify_matches_qwen2vl_image_processor():
    """A rendered 56×84 frame (8-bit) through Qwen2-VL's image processor (PIL backend; the default
    one needs torchvision) and through `patchify` of the frame twice: measured max |diff| = 0."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    frame = render_clip(Attributes("yellow", "triangle", "right"), 3, 0, 1, 56, 84)[0]
    pixels = (frame * 255).round().to(torch.uint8)
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    ref = Qwen2VLImageProcessorPil()(images=[image], return_tensors="pt")
    mean, std = torch.tensor(va.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(va.CLIP_STD).view(1, 3, 1, 1)
    x = (pixels.float() / 255).unsqueeze(0).expand(2, -1, -1, -1)
    patches, grid = va.patchify((x - mean) / std)
    assert ref["image_grid_thw"].tolist() == [list(grid)] == [[1, 4, 6]]
    diff = (patches - ref["pixel_values"]).abs().max().item()
    assert diff < 1e-6, diff


def test_frame_sampling_follows_upstream():
    assert va.frame_count(81, 16, 2.0) == 10  # 81/16·2 = 10.1 → 10
    assert va.frame_count(9, 16, 2.0) == 4  # at least 4
    assert va.frame_count(3, 16, 2.0) == 2  # at most the (even part of the) video
    assert va.frame_count(9, 16, None, num_frames=5) == 4  # Python's round(2.5) = 2, as upstream
    assert va.frame_count(9, 16, None, num_frames=7) == 8
    assert va.smart_resize(480, 832, 28, va.VIDEO_MIN_PIXELS, 200704) == (336, 588)
    assert va.smart_resize(56, 56, 28, va.VIDEO_MIN_PIXELS, 200704) == (336, 336)
    sampling = va.Sampling(video_fps=16, fps=2.0, num_frames=None, min_pixels=va.VIDEO_MIN_PIXELS, max_pixels=200704)
    video = torch.arange(9.0).view(9, 1, 1, 1).expand(9, 3, 56, 56) / 255
    frames = va.prepare_frames(video, sampling)
    assert frames.shape == (4, 3, 336, 336)
    assert (frames[:, :, 100, 100] * 255).round()[:, 0].tolist() == [0, 3, 5, 8]  # round(linspace(0, 8, 4))
    assert va.prepare_frames(video[:1], sampling).shape[0] == 2  # one frame: repeated to a pair


def test_position_ids_match_transformers(published):
    model = build_reward("videoalign", **published).shared
    video = model.video_token
    for grid, same in (((2, 8, 8), True), ((6, 4, 4), False)):
        n = grid[0] * grid[1] * grid[2] // 4
        ids = torch.tensor([[1, 2, 3] + [video] * n + [4, 5]])
        types = (ids == video).long() * 2
        ours = va.position_ids(ids.shape[1], 3, grid, 2)
        theirs = model.model.get_rope_index(ids, types, video_grid_thw=torch.tensor([grid]))[0][:, 0]
        assert torch.equal(ours[:, :3 + n], theirs[:, :3 + n])
        assert torch.equal(ours, theirs) == same
        assert ours[0, 3 + n].item() == 3 + max(grid[0], grid[1] // 2, grid[2] // 2)


def test_template_option(tmp_path, published):
    x = videos()
    default = build_reward("videoalign", **published)(x, PROMPTS, [{}, {}])
    good = tmp_path / "rubric.txt"
    good.write_text("Caption: {prompt}\nVQ <|VQ_reward|> MQ <|MQ_reward|> TA <|TA_reward|>\n")
    custom = build_reward("videoalign", template=str(good), **published)(x, PROMPTS, [{}, {}])
    assert torch.isfinite(custom["score"]).all() and not torch.allclose(custom["score"], default["score"])
    bad = tmp_path / "bad.txt"
    bad.write_text("{prompt} <|VQ_reward|> <|MQ_reward|>")
    with pytest.raises(ConfigError, match=r"<\|TA_reward\|> appears 0 times"):
        build_reward("videoalign", template=str(bad), **published)


def test_missing_files_name_the_file_and_how_to_get_it(tmp_path, tiny_videoalign_dirs, published):
    path, base = tiny_videoalign_dirs["published"]
    with pytest.raises(ConfigError, match="not a folder.*KwaiVGI/VideoReward"):
        build_reward("videoalign", path=str(tmp_path / "nowhere"), base=str(base))
    folder = tmp_path / "VideoReward"
    folder.mkdir()
    with pytest.raises(ConfigError, match="model_config.json not found.*KwaiVGI/VideoReward"):
        build_reward("videoalign", path=str(folder), base=str(base))
    shutil.copy(path / "model_config.json", folder / "model_config.json")
    with pytest.raises(ConfigError, match="no checkpoint-N folder.*model.pth.*huggingface-cli download"):
        build_reward("videoalign_vq", path=str(folder), base=str(base))
    (folder / "checkpoint-5").mkdir()
    with pytest.raises(ConfigError, match="neither model.pth nor adapter_config.json, adapter_model.safetensors, "
                                          "non_lora_state_dict.pth"):
        build_reward("videoalign", path=str(folder), base=str(base))
    with pytest.raises(ConfigError, match="needs option base.*Qwen/Qwen2-VL-2B-Instruct.*huggingface-cli download"):
        build_reward("videoalign", path=published["path"])
    empty = tmp_path / "base"
    empty.mkdir()
    with pytest.raises(ConfigError, match="config.json not found"):
        build_reward("videoalign", path=published["path"], base=str(empty))
    with pytest.raises(ConfigError, match="output must be one of overall, vq, mq, ta"):
        build_reward("videoalign", output="all", **published)


def test_tiny_folders_have_the_published_layout(tiny_videoalign_dirs):
    path, base = tiny_videoalign_dirs["published"]
    ckpt = next(path.glob("checkpoint-*"))
    assert {"model.pth", "tokenizer"} <= {p.name for p in ckpt.iterdir()}
    keys = torch.load(ckpt / "model.pth", map_location="cpu", weights_only=True)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in keys
    assert keys["base_model.model.rm_head.weight"].shape == (1, 32)
    path, _ = tiny_videoalign_dirs["adapter"]
    ckpt = next(path.glob("checkpoint-*"))
    assert {"adapter_config.json", "adapter_model.safetensors", "non_lora_state_dict.pth"} <= {
        p.name for p in ckpt.iterdir()}
    assert np.isclose(json.loads((path / "model_config.json").read_text())["inference_config"]["VQ_std"], 2.2476)
