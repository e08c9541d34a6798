"""The synthetic shapes world: determinism, captions, the held-out split."""
import pytest
import torch

from megaflow.demo.world import (COLORS, DIRECTIONS, FRAMES, HEIGHT, SHAPES, WIDTH, all_attributes, parse_prompt,
                                 render_clip, sample_dataset, split_prompts)


def test_clips_are_deterministic_in_the_seed_and_differ_across_seeds():
    a, caps_a = sample_dataset(6, seed=3)
    b, caps_b = sample_dataset(6, seed=3)
    c, _ = sample_dataset(6, seed=4)
    assert torch.equal(a, b) and caps_a == caps_b
    assert not torch.equal(a, c)
    assert a.shape == (6, FRAMES, 3, HEIGHT, WIDTH) and 0 <= float(a.min()) and float(a.max()) <= 1


def test_the_object_stays_inside_the_frame_and_moves_its_way():
    for attrs in all_attributes():
        clip = render_clip(attrs, seed=9)
        obj = (clip - clip[:, :, :1, :1]).abs().amax(1) > 0.05  # [F, H, W]
        assert not obj[:, 0].any() and not obj[:, -1].any() and not obj[:, :, 0].any() and not obj[:, :, -1].any()
        ys, xs = torch.meshgrid(torch.arange(HEIGHT).float(), torch.arange(WIDTH).float(), indexing="ij")
        cx = [(xs * m).sum() / m.sum() for m in obj.float()]
        cy = [(ys * m).sum() / m.sum() for m in obj.float()]
        dx, dy = DIRECTIONS[attrs.direction]
        assert float(cx[-1] - cx[0]) * dx + float(cy[-1] - cy[0]) * dy > 8


def test_held_out_prompts_are_new_combinations_of_seen_words():
    train, held = split_prompts(0)
    assert len(train) + len(held) == len(COLORS) * len(SHAPES) * len(DIRECTIONS) and len(held) == 8
    assert not set(train) & set(held)
    seen = [parse_prompt(p) for p in train]
    for field, values in (("color", COLORS), ("shape", SHAPES), ("direction", DIRECTIONS)):
        assert {getattr(a, field) for a in seen} == set(values)
    assert split_prompts(0) == (train, held) and split_prompts(1) != (train, held)


def test_prompt_parsing():
    assert parse_prompt("A  Red circle moving left").prompt == "a red circle moving left"
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        parse_prompt("a purple circle moving left")
