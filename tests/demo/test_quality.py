"""The shapes world's quality metrics: ground truth scores about 1, and each metric falls for the
defect it watches (a two-coloured or ragged object, a flickering one, a dirty background)."""
import pytest
import torch

from megaflow.demo.quality import METRICS, quality, video_quality
from megaflow.demo.world import BACKGROUND, COLORS, all_attributes, parse_prompt, render_clip
from megaflow.rewards import RewardSet


@pytest.fixture(scope="module")
def truth():
    attrs = all_attributes()[::4]
    return torch.stack([render_clip(a, seed=s) for a in attrs for s in (0, 1)]), [
        {"shape": a.shape} for a in attrs for _ in (0, 1)]


def test_ground_truth_clips_score_at_least_095_on_every_metric(truth):
    clips, meta = truth
    scores = quality(clips, meta)
    for name in METRICS:
        assert float(scores[name].mean()) >= 0.95, (name, scores[name])
        assert float(scores[name].min()) >= 0.9, (name, scores[name])


def _object(video):
    return (video - torch.tensor(BACKGROUND).view(1, 3, 1, 1)).norm(dim=1) > 0.3  # [F, H, W]


def test_a_two_coloured_object_scores_lower_on_purity():
    video = render_clip(parse_prompt("a blue circle moving right"), seed=2)
    smear = video.clone()
    mask = _object(video)
    rows = torch.arange(video.shape[-2])[None, :, None].expand_as(mask)
    centre = (rows * mask).flatten(1).sum(1) / mask.flatten(1).sum(1)
    lower = mask & (rows > centre[:, None, None])  # the lower half of the object turns green
    green = torch.tensor(COLORS["green"]).view(3, 1)
    for f in range(video.shape[0]):
        smear[f][:, lower[f]] = green
    clean, bad = video_quality(video, "circle"), video_quality(smear, "circle")
    assert clean["quality/purity"] >= 0.99 and bad["quality/purity"] < 0.7, bad


def test_a_ragged_torn_object_scores_lower_on_smoothness():
    video = render_clip(parse_prompt("a red square moving up"), seed=2)
    torn = video.clone()
    g = torch.Generator().manual_seed(0)
    mask = _object(video)
    grown = torch.nn.functional.max_pool2d(mask.float()[:, None], 3, stride=1, padding=1)[:, 0].bool()
    ring = grown & ~mask
    flip = torch.rand(mask.shape, generator=g) < 0.5
    red = torch.tensor(COLORS["red"]).view(3, 1)
    bg = torch.tensor(BACKGROUND).view(3, 1)
    for f in range(video.shape[0]):
        torn[f][:, ring[f] & flip[f]] = red  # spikes out of the outline
        torn[f][:, mask[f] & flip[f] & (torch.rand(mask[f].shape, generator=g) < 0.15)] = bg  # holes
    clean, bad = video_quality(video, "square"), video_quality(torn, "square")
    assert clean["quality/smoothness"] >= 0.95 and bad["quality/smoothness"] < 0.75, bad


def test_flicker_and_a_dirty_background_score_lower_on_temporal_and_background():
    video = render_clip(parse_prompt("a yellow triangle moving left"), seed=1)
    flicker = video.clone()
    flicker[1::2] = torch.tensor(BACKGROUND).view(1, 3, 1, 1) + 0.6 * (video[1::2] - torch.tensor(BACKGROUND).view(
        1, 3, 1, 1))  # every other frame fades
    dirty = (video + 0.15 * torch.rand(video.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    clean = video_quality(video, "triangle")
    assert video_quality(flicker, "triangle")["quality/temporal"] < clean["quality/temporal"] - 0.2
    assert video_quality(dirty, "triangle")["quality/background"] < clean["quality/background"] - 0.3


def test_the_shapes_reward_offers_the_metrics_as_monitors_never_as_scores(truth):
    clips, meta = truth
    rewards = RewardSet({"shapes": 1.0})
    prompts = [a.prompt for a in all_attributes()[::4] for _ in (0, 1)]
    monitored = rewards.monitor(clips[:4], prompts[:4], [{}] * 4)
    assert set(monitored) == set(METRICS)
    assert not any(k.startswith("quality") for k in rewards.score(clips[:4], prompts[:4], [{}] * 4).details)
