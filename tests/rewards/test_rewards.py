"""Built-in rewards give their documented values; RewardSet and the registry fail loudly."""
from __future__ import annotations

import math

import pytest
import torch

from megaflow.errors import ConfigError, RewardError
from megaflow.rewards import (
    RewardSet,
    available_rewards,
    build_reward,
    luminance,
    register_reward,
    validate_videos,
)
from megaflow.rewards.base import _REGISTRY

B, F, H, W = 2, 3, 16, 16


def solid(rgb: tuple[float, float, float], batch: int = B, frames: int = F) -> torch.Tensor:
    """A video of one colour: `[batch, frames, 3, H, W]`."""
    color = torch.tensor(rgb, dtype=torch.float32).view(1, 1, 3, 1, 1)
    return color.expand(batch, frames, 3, H, W).clone()


def grey(level: float, batch: int = B, frames: int = F) -> torch.Tensor:
    return solid((level, level, level), batch, frames)


def noise(batch: int = B, frames: int = F, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, frames, 3, H, W, generator=g)


def score(name: str, videos: torch.Tensor, **options) -> torch.Tensor:
    reward = build_reward(name, **options)
    n = videos.shape[0]
    out = reward(videos, ["a prompt"] * n, [{}] * n)
    assert out.shape == (n,) and out.dtype == torch.float32
    return out


@pytest.fixture
def temp_rewards():
    """Register test-only rewards and remove them afterwards."""
    before = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(before)


def test_builtins_registered():
    assert {"brightness", "color", "smoothness", "compressibility", "contrast"} <= set(
        available_rewards()
    )
    assert available_rewards() == sorted(available_rewards())


def test_luminance_rec601():
    v = solid((1.0, 0.0, 0.0))
    assert torch.allclose(luminance(v), torch.full((B, F, H, W), 0.299))
    assert torch.allclose(luminance(solid((0.0, 1.0, 0.0))), torch.full((B, F, H, W), 0.587))


def test_brightness_values_and_ranking():
    assert torch.allclose(score("brightness", grey(0.7)), torch.ones(B))
    assert torch.allclose(score("brightness", grey(0.2)), torch.full((B,), 0.5))
    assert torch.allclose(score("brightness", grey(0.0), target=0.0), torch.ones(B))
    levels = torch.tensor([0.1, 0.3, 0.5, 0.65])
    videos = torch.cat([grey(float(x), batch=1) for x in levels])
    s = score("brightness", videos)
    assert torch.all(s[1:] > s[:-1]), s
    assert torch.allclose(s, 1 - (levels - 0.7).abs(), atol=1e-6)


def test_color_values_and_ranking():
    assert torch.allclose(score("color", solid((1.0, 0.2, 0.2))), torch.ones(B))
    assert torch.allclose(score("color", solid((0.0, 0.0, 0.0)), target=(1, 1, 1)), torch.zeros(B), atol=1e-6)
    blue = solid((0.0, 0.0, 1.0))
    expected = 1 - math.sqrt(1.0**2 + 0.2**2 + 0.8**2) / math.sqrt(3)
    assert torch.allclose(score("color", blue), torch.full((B,), expected), atol=1e-6)
    half = torch.cat([solid((1.0, 0.2, 0.2), frames=1), blue[:, :1]], dim=1)
    assert torch.allclose(score("color", half), torch.full((B,), (1 + expected) / 2), atol=1e-6)
    videos = torch.cat([solid((0.0, 0.2, 0.2), 1), solid((0.5, 0.2, 0.2), 1), solid((0.9, 0.2, 0.2), 1)])
    s = score("color", videos)
    assert torch.all(s[1:] > s[:-1]), s


def test_smoothness():
    assert torch.allclose(score("smoothness", grey(0.3)), torch.ones(B))
    assert torch.allclose(score("smoothness", noise(frames=1)), torch.ones(B))
    flicker = torch.cat([grey(0.0, frames=1), grey(1.0, frames=1), grey(0.0, frames=1)], dim=1)
    assert torch.allclose(score("smoothness", flicker), torch.zeros(B))
    ramp = torch.cat([grey(0.0, frames=1), grey(0.1, frames=1), grey(0.2, frames=1)], dim=1)
    assert torch.allclose(score("smoothness", ramp), torch.full((B,), 0.9), atol=1e-6)
    assert torch.all(score("smoothness", noise()) < score("smoothness", ramp))


def test_compressibility():
    flat = score("compressibility", grey(0.5))
    rough = score("compressibility", noise())
    assert torch.all(flat < 0) and torch.all(rough < 0)
    assert torch.all(flat > rough), (flat, rough)
    assert torch.equal(flat[0], flat[1])
    assert torch.equal(rough, score("compressibility", noise()))
    low_q = score("compressibility", noise(), quality=10)
    assert torch.all(low_q > rough)


def test_contrast():
    assert torch.allclose(score("contrast", grey(0.4)), torch.zeros(B))
    half = grey(0.0)
    half[..., : W // 2] = 1.0
    assert torch.allclose(score("contrast", half), torch.full((B,), 0.5), atol=1e-6)
    assert torch.all(score("contrast", noise()) > 0)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match=r"brightness.*accepted options: target"):
        build_reward("brightness", targt=0.5)
    with pytest.raises(ConfigError, match="smoothness.*accepted options: \\(none\\)"):
        build_reward("smoothness", window=3)
    with pytest.raises(ConfigError, match="target must be in \\[0, 1\\]"):
        build_reward("brightness", target=1.5)
    with pytest.raises(ConfigError, match="RGB triple"):
        build_reward("color", target=(1.0, 0.0))
    with pytest.raises(ConfigError, match="quality"):
        build_reward("compressibility", quality=0)


def test_unknown_reward_suggests_closest():
    with pytest.raises(ConfigError) as info:
        build_reward("brigthness")
    msg = str(info.value)
    assert "'brigthness'" in msg and "Did you mean 'brightness'" in msg
    for name in available_rewards():
        assert name in msg
    with pytest.raises(ConfigError, match="unknown reward 'contrst'"):
        RewardSet({"contrst": 1.0})


def test_function_factory_and_missing_option(temp_rewards):
    @register_reward("test_const")
    def make_const(value: float):
        return lambda videos, prompts, metadata: torch.full((videos.shape[0],), value)

    assert "test_const" in available_rewards()
    assert torch.equal(build_reward("test_const", value=2.0)(grey(0.1), [], []), torch.full((B,), 2.0))
    with pytest.raises(ConfigError, match="test_const.*missing.*value"):
        build_reward("test_const")

    def other(value: float):
        return make_const(value)

    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_const")(other)


def test_reward_set_scores_and_weights():
    rs = RewardSet({"brightness": 2.0, "contrast": -0.5}, options={"brightness": {"target": 0.2}})
    assert rs.weights == {"brightness": 2.0, "contrast": -0.5}
    videos = torch.cat([grey(0.2, 1), grey(0.6, 1)])
    scores = rs(videos, ["a", "b"], [{}, {}])
    assert set(scores) == {"brightness", "contrast"}
    for s in scores.values():
        assert s.shape == (2,) and s.dtype == torch.float32 and s.device.type == "cpu"
    assert torch.allclose(scores["brightness"], torch.tensor([1.0, 0.6]))
    total = rs.weighted_sum(scores)
    assert torch.allclose(total, 2.0 * scores["brightness"] - 0.5 * scores["contrast"])
    with pytest.raises(RewardError, match="missing"):
        rs.weighted_sum({"brightness": scores["brightness"]})


def test_reward_set_config_errors():
    with pytest.raises(ConfigError, match="no rewards configured"):
        RewardSet({})
    with pytest.raises(ConfigError, match="brightness.*targt"):
        RewardSet({"brightness": 1.0}, options={"brightness": {"targt": 0.3}})
    with pytest.raises(ConfigError, match="color"):
        RewardSet({"brightness": 1.0}, options={"color": {"target": (1, 0, 0)}})
    with pytest.raises(ConfigError, match="weight must be finite"):
        RewardSet({"brightness": float("nan")})


def test_reward_set_component_failures(temp_rewards):
    @register_reward("test_raises")
    def make_raises():
        def reward(videos, prompts, metadata):
            raise KeyError("missing_field")

        return reward

    @register_reward("test_nan")
    def make_nan():
        return lambda videos, prompts, metadata: torch.tensor([0.5, float("nan")])

    @register_reward("test_inf")
    def make_inf():
        return lambda videos, prompts, metadata: torch.tensor([float("inf"), 0.5])

    @register_reward("test_shape")
    def make_shape():
        return lambda videos, prompts, metadata: torch.zeros(videos.shape[0], 1)

    videos, prompts, meta = grey(0.5), ["a", "b"], [{}, {}]

    with pytest.raises(RewardError, match="'test_raises' raised KeyError") as info:
        RewardSet({"brightness": 1.0, "test_raises": 1.0})(videos, prompts, meta)
    assert isinstance(info.value.__cause__, KeyError)

    with pytest.raises(RewardError, match=r"'test_nan'.*non-finite.*\[1\]"):
        RewardSet({"test_nan": 1.0})(videos, prompts, meta)
    with pytest.raises(RewardError, match=r"'test_inf'.*non-finite.*\[0\]"):
        RewardSet({"test_inf": 1.0})(videos, prompts, meta)
    with pytest.raises(RewardError, match=r"'test_shape'.*shape \[2, 1\].*expected \[2\]"):
        RewardSet({"test_shape": 1.0})(videos, prompts, meta)


def test_reward_set_validates_videos():
    rs = RewardSet({"brightness": 1.0})
    with pytest.raises(RewardError, match=r"\[B, F, 3, H, W\]"):
        rs(torch.rand(2, 3, H, W), ["a", "b"], [{}, {}])
    with pytest.raises(RewardError, match=r"\[B, F, 3, H, W\]"):
        rs(torch.rand(2, 1, 4, H, W), ["a", "b"], [{}, {}])
    with pytest.raises(RewardError, match=r"\[0, 1\].*-1"):
        rs(grey(0.5) * 2 - 1.5, ["a", "b"], [{}, {}])
    with pytest.raises(RewardError, match="NaN"):
        rs(torch.full((B, F, 3, H, W), float("nan")), ["a", "b"], [{}, {}])
    with pytest.raises(RewardError, match="2 videos but 1 prompts"):
        rs(grey(0.5), ["a"], [{}, {}])
    with pytest.raises(RewardError, match="dtype"):
        validate_videos(torch.zeros(B, F, 3, H, W, dtype=torch.uint8))


class _Counted:
    """A reward that counts how often it was built, reports a sub-score and can be moved."""

    built = 0

    def __init__(self, device: str = "cpu") -> None:
        type(self).built += 1
        self.device = device
        self.moves: list[str] = []

    def to(self, device):
        self.moves.append(str(device))
        return self

    def __call__(self, videos, prompts, metadata):
        mean = videos.float().flatten(1).mean(1)
        return {"score": mean, "half": mean / 2}


register_reward("test_counted")(_Counted)


def test_lazy_sets_build_on_first_use_and_sub_scores_are_reported_beside_the_score():
    _Counted.built = 0
    rewards = RewardSet({"test_counted": 1.0}, lazy=True, device="cuda:3")
    assert _Counted.built == 0  # checked, not built: ranks that do not score never load the model
    videos = grey(0.5)
    result = rewards.score(videos, ["a", "b"], [{}, {}])
    assert _Counted.built == 1 and rewards.rewards["test_counted"].device == "cuda:3"
    torch.testing.assert_close(result.components["test_counted"], torch.full((B,), 0.5))
    torch.testing.assert_close(result.details["test_counted/half"], torch.full((B,), 0.25))
    assert set(rewards(videos, ["a", "b"], [{}, {}])) == {"test_counted"}  # components only
    assert _Counted.built == 1


def test_offload_moves_rewards_to_the_device_to_score_and_back_to_the_cpu():
    rewards = RewardSet({"test_counted": 1.0}, device="cpu", offload=True)
    rewards.score(grey(0.5), ["a", "b"], [{}, {}])
    assert rewards.rewards["test_counted"].moves == ["cpu", "cpu"]
    rewards = RewardSet({"test_counted": 1.0}, {"test_counted": {"device": "meta"}}, device="cpu", offload=True)
    assert rewards.rewards["test_counted"].device == "meta"  # an explicit option wins over reward.device


def test_rewards_accept_low_precision_videos_on_their_device():
    videos = noise()
    full = RewardSet({"brightness": 1.0, "contrast": 1.0})(videos, ["a", "b"], [{}, {}])
    half = RewardSet({"brightness": 1.0, "contrast": 1.0})(videos.bfloat16(), ["a", "b"], [{}, {}])
    for name in full:
        assert half[name].dtype == torch.float32
        torch.testing.assert_close(half[name], full[name], rtol=0, atol=4e-3)  # bf16 pixels: 8-bit mantissa


def test_a_mapping_without_score_is_a_clear_error():
    register_reward("test_no_score")(lambda: (lambda v, p, m: {"vq": v.flatten(1).mean(1)}))
    with pytest.raises(RewardError, match="without a 'score' entry"):
        RewardSet({"test_no_score": 1.0})(grey(0.5), ["a", "b"], [{}, {}])
