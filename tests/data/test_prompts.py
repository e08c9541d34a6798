"""Prompt sets from text or prompt/image JSONL files, and the conditioning images they name."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from megaflow.data.images import load_image
from megaflow.data.prompts import PromptSet, resolve_data_path
from megaflow.errors import DataError


def _png(path, width, height, color=(255, 0, 0)):
    Image.new("RGB", (width, height), color).save(path)
    return path


def test_jsonl_records_give_prompts_with_images_relative_to_the_file(tmp_path):
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png", 8, 8)
    _png(tmp_path / "img" / "b.png", 8, 8)
    lines = [{"prompt": "a red ball", "image": "img/a.png"}, {"prompt": "a cat", "image": "img/b.png"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    prompts = PromptSet.from_file(tmp_path / "p.jsonl", seed=0)
    assert prompts.prompts == ["a red ball", "a cat"]
    assert prompts.images == [tmp_path / "img" / "a.png", tmp_path / "img" / "b.png"]
    assert {text for _, text in prompts.batch(0, 2)} == {"a red ball", "a cat"}
    # Text-only JSONL is a plain prompt set.
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "a dog"}) + "\n")
    assert PromptSet.from_file(tmp_path / "t.jsonl").images is None


def test_bad_records_and_missing_images_name_the_line_and_the_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        PromptSet.from_file(tmp_path / "bad.jsonl")
    (tmp_path / "missing.jsonl").write_text(json.dumps({"prompt": "x", "image": "nowhere.png"}) + "\n")
    with pytest.raises(DataError, match="nowhere.png"):
        PromptSet.from_file(tmp_path / "missing.jsonl")


def test_shipped_recipe_files_are_found_by_name():
    path = resolve_data_path("tiny_i2v_prompts.jsonl")
    assert path.is_file()
    assert PromptSet.from_file("tiny_i2v_prompts.jsonl").images is not None


def test_image_is_scaled_to_cover_and_centre_cropped(tmp_path):
    # 40×20 image: left half red, right half blue; cropped to 10×10 from the centre after scaling to 20×10.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    img = load_image(str(tmp_path / "wide.png"), 10, 10)
    assert img.shape == (3, 10, 10) and img.dtype == torch.float32
    assert 0 <= float(img.min()) and float(img.max()) <= 1
    assert float(img[0, :, 0].mean()) > 0.9  # red on the left
    assert float(img[2, :, -1].mean()) > 0.9  # the centre crop keeps both halves


def test_unreadable_image_is_a_data_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_image(str(tmp_path / "broken.png"), 8, 8)


def test_jsonl_fields_other_than_prompt_and_image_are_the_prompts_metadata(tmp_path):
    path = tmp_path / "geneval.jsonl"
    path.write_text('{"prompt": "a photo of a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]}\n'
                    '\n{"prompt": "two dogs"}\n')
    prompts = PromptSet.from_file(path)
    assert prompts.prompts == ["a photo of a cat", "two dogs"]
    assert prompts.metadata == [{"tag": "single_object", "include": [{"class": "cat", "count": 1}]}, {}]
    assert PromptSet(["a", "b"]).metadata == [{}, {}]


def test_the_demo_prompt_files_are_the_worlds_split_with_its_attributes():
    from megaflow.demo.world import parse_prompt, split_prompts

    for name, expected in zip(("demo_prompts.jsonl", "demo_heldout.jsonl"), split_prompts(0)):
        prompts = PromptSet.from_file(name)
        assert prompts.prompts == expected
        for text, meta in zip(prompts.prompts, prompts.metadata):
            attrs = parse_prompt(text)
            assert meta == {"color": attrs.color, "shape": attrs.shape, "direction": attrs.direction}
