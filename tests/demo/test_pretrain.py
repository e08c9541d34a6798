"""Pretraining pieces: the noisy captions the base model learns from."""
import pytest
import torch

from megaflow.demo.pretrain import NoisyCaptions
from megaflow.demo.world import COLORS, DIRECTIONS, SHAPES, parse_prompt, split_prompts


def _agreement(p: float) -> dict[str, float]:
    train, _ = split_prompts(0)
    ids = torch.arange(len(train)).repeat(400)
    noisy = NoisyCaptions(train, p)(ids, torch.Generator().manual_seed(0))
    pairs = [(parse_prompt(train[i]), parse_prompt(train[j])) for i, j in zip(ids.tolist(), noisy.tolist())]
    return {a: sum(getattr(x, a) == getattr(y, a) for x, y in pairs) / len(pairs)
            for a in ("color", "shape", "direction")}


@pytest.mark.parametrize("p", [0.0, 0.75, 1.0])
def test_each_attribute_is_replaced_at_the_configured_rate(p):
    """An attribute agrees with the clip when it is kept (1 − p) or redrawn to the same value (p/k),
    or when the corrupted caption is a held-out prompt and falls back (at most p · 8/48)."""
    agree = _agreement(p)
    held = len(split_prompts(0)[1]) / (len(COLORS) * len(SHAPES) * len(DIRECTIONS))
    for a, k in (("color", len(COLORS)), ("shape", len(SHAPES)), ("direction", len(DIRECTIONS))):
        low = 1 - p + p / k
        assert low - 0.02 <= agree[a] <= low + p * held + 0.02, (a, p, agree)


def test_noisy_captions_never_name_a_held_out_prompt():
    train, held_out = split_prompts(0)
    ids = torch.arange(len(train)).repeat(200)
    noisy = NoisyCaptions(train, 0.9)(ids, torch.Generator().manual_seed(1))
    assert noisy.min() >= 0 and noisy.max() < len(train)
    assert not {train[i] for i in noisy.tolist()} & set(held_out)
    with pytest.raises(ValueError, match="caption_noise"):
        NoisyCaptions(train, 1.5)
