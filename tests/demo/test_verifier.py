"""The `shapes` verifier: accuracy on ground-truth clips of the shapes world, partial credit, errors."""
import pytest
import torch

from megaflow.demo.world import BACKGROUND, all_attributes, parse_prompt, render_clip
from megaflow.errors import ConfigError, RewardError
from megaflow.rewards import RewardSet, available_rewards
from megaflow.demo.verifier import ATTRIBUTES, ShapesReward, estimate


def _blur(video: torch.Tensor) -> torch.Tensor:
    """A 3×3 box blur per frame and channel: `[F, 3, H, W]` → same shape (a soft decoder's look)."""
    f, c, h, w = video.shape
    kernel = torch.full((c, 1, 3, 3), 1 / 9)
    padded = torch.nn.functional.pad(video, (1, 1, 1, 1), mode="replicate")
    return torch.nn.functional.conv2d(padded, kernel, groups=c)


def _accuracy(transform) -> dict[str, float]:
    hits = {a: 0.0 for a in ATTRIBUTES}
    clips = [(attrs, seed, i) for seed in (11, 12) for i, attrs in enumerate(all_attributes())]
    for attrs, seed, i in clips:
        video = transform(render_clip(attrs, seed, i), seed * 1000 + i)
        for a, hit in estimate(video).matches(attrs).items():
            hits[a] += hit
    return {a: h / len(clips) for a, h in hits.items()}


def test_accuracy_on_ground_truth_clips_is_at_least_95_percent_per_attribute():
    acc = _accuracy(lambda v, s: v)
    assert all(v >= 0.95 for v in acc.values()), acc


def test_accuracy_on_blurred_noisy_clips_is_at_least_95_percent_per_attribute():
    def degrade(video, seed):
        noise = 0.03 * torch.randn(video.shape, generator=torch.Generator().manual_seed(seed))
        return (_blur(video) + noise).clamp(0, 1)

    acc = _accuracy(degrade)
    assert all(v >= 0.95 for v in acc.values()), acc


def test_partial_credit_is_the_fraction_of_matched_attributes():
    video = render_clip(parse_prompt("a red circle moving left"), seed=3)[None]
    reward = ShapesReward()
    prompts = ["a red circle moving left", "a red circle moving right", "a red square moving up",
               "a blue square moving right"]
    scores = reward(video.expand(4, -1, -1, -1, -1), prompts, [{}] * 4)
    torch.testing.assert_close(scores["score"], torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(scores["shape"], torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_every_shape_colour_and_direction_is_told_apart():
    for attrs in all_attributes():
        est = estimate(render_clip(attrs, seed=5))
        assert (est.color, est.shape, est.direction) == (attrs.color, attrs.shape, attrs.direction)


def test_blank_and_static_videos_get_no_credit_for_what_they_do_not_show():
    blank = torch.tensor(BACKGROUND).view(1, 1, 3, 1, 1).expand(1, 9, 3, 32, 32).clone()
    assert float(ShapesReward()(blank, ["a red circle moving left"], [{}])["score"][0]) == 0.0
    frame = render_clip(parse_prompt("a green square moving up"), seed=1)[:1]
    static = frame.expand(9, -1, -1, -1)[None]
    est = estimate(static[0])
    assert est.direction is None and est.color == "green" and est.shape == "square"
    assert float(ShapesReward()(static, ["a green square moving up"], [{}])["score"][0]) == pytest.approx(2 / 3)


def test_registered_and_used_through_reward_set():
    assert "shapes" in available_rewards()
    rewards = RewardSet({"shapes": 1.0}, {"shapes": {"weights": {"color": 1, "shape": 0, "direction": 0}}})
    video = render_clip(parse_prompt("a yellow triangle moving down"), seed=2)[None]
    out = rewards(video, ["a yellow square moving up"], [{}])
    assert float(out["shapes"][0]) == 1.0


def test_prompts_outside_the_world_and_bad_options_are_clear_errors():
    video = render_clip(parse_prompt("a red circle moving left"), seed=0)[None]
    with pytest.raises(RewardError, match="not a shapes-world caption"):
        RewardSet({"shapes": 1.0})(video, ["a cat on a mat"], [{}])
    with pytest.raises(ConfigError, match="weights"):
        RewardSet({"shapes": 1.0}, {"shapes": {"weights": {"size": 1.0}}})


def test_soft_credit_is_near_one_for_the_true_caption_and_ranks_wrong_ones_lower():
    soft = ShapesReward(soft=True)
    for attrs in all_attributes()[::5]:
        video = render_clip(attrs, seed=4)[None]
        true = float(soft(video, [attrs.prompt], [{}])["score"][0])
        assert true >= 0.9, (attrs, true)
        others = [a for a in all_attributes() if a != attrs]
        wrong = soft(video.expand(len(others), -1, -1, -1, -1), [a.prompt for a in others],
                     [{}] * len(others))["score"]
        misses = torch.tensor([sum(getattr(a, f) != getattr(attrs, f) for f in ("color", "shape", "direction"))
                               for a in others])
        assert float(wrong.max()) < true
        # every caption wrong in one attribute scores above every caption wrong in all three
        assert float(wrong[misses == 1].min()) > float(wrong[misses == 3].max())


def test_soft_colour_credit_grows_as_the_object_moves_towards_the_prompted_colour():
    red = render_clip(parse_prompt("a red circle moving left"), seed=6)
    bg = torch.tensor(BACKGROUND).view(1, 3, 1, 1)
    mask = (red - bg).abs().amax(1, keepdim=True) > 0.05
    target, start = torch.tensor([0.95, 0.85, 0.15]), torch.tensor([0.90, 0.15, 0.15])  # yellow, red
    credit = []
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        colour = ((1 - t) * start + t * target).view(1, 3, 1, 1)
        video = torch.where(mask, colour.expand_as(red), red)
        credit.append(ShapesReward(soft=True).attribute_scores(video[None], ["a yellow circle moving left"])["color"])
    credit = torch.cat(credit)
    assert bool((credit[1:] >= credit[:-1]).all()) and credit[0] < 0.05 and credit[-1] > 0.95, credit


def test_soft_direction_credit_follows_the_cosine_of_the_travel():
    video = render_clip(parse_prompt("a blue square moving right"), seed=2)[None]
    scores = ShapesReward(soft=True).attribute_scores(video.expand(3, -1, -1, -1, -1), [
        "a blue square moving right", "a blue square moving up", "a blue square moving left"])["direction"]
    assert scores[0] > 0.9 and scores[1] < 0.2 and scores[2] == 0.0, scores
    with pytest.raises(ConfigError, match="soft must be true or false"):
        ShapesReward(soft="yes")


def test_the_target_comes_from_the_prompt_records_metadata():
    """A JSONL record's colour/shape/direction are what the verifier checks (not the caption), and an
    attribute outside the world is a clear error."""
    video = render_clip(parse_prompt("a red circle moving left"), seed=3)[None]
    meta = {"color": "red", "shape": "circle", "direction": "left"}
    scores = ShapesReward()(video, ["an unparsable caption"], [meta])
    assert float(scores["score"][0]) == 1.0
    with pytest.raises(RewardError, match="metadata color 'purple'"):
        RewardSet({"shapes": 1.0})(video, ["x"], [{**meta, "color": "purple"}])
