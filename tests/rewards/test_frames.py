"""The frame sampler of image rewards."""
import pytest
import torch

from megaflow.errors import ConfigError
from megaflow.rewards.frames import frame_indices, sample_frames


@pytest.mark.parametrize("spec, frames, expected", [
    ("first", 9, [0]), ("middle", 9, [4]), ("middle", 8, [3]), ("last", 9, [8]), ("all", 3, [0, 1, 2]),
    ("uniform:3", 9, [0, 4, 8]), ("uniform:4", 9, [0, 3, 5, 8]), ("uniform:1", 9, [4]), ("uniform:5", 2, [0, 1]),
    ("uniform:4", 1, [0]),
])
def test_frame_indices(spec, frames, expected):
    assert frame_indices(spec, frames) == expected


def test_sample_frames_picks_those_frames_of_every_video():
    videos = torch.arange(2 * 9, dtype=torch.float32).view(2, 9, 1, 1, 1).expand(2, 9, 3, 2, 2)
    picked = sample_frames(videos, "uniform:3")
    assert picked.shape == (2, 3, 3, 2, 2)
    assert picked[:, :, 0, 0, 0].tolist() == [[0, 4, 8], [9, 13, 17]]


@pytest.mark.parametrize("spec", ["uniform:0", "uniform:x", "every", "", 3])
def test_bad_frame_choices_name_the_valid_forms(spec):
    with pytest.raises(ConfigError, match="first, middle, last, all or uniform:K"):
        frame_indices(spec, 9)
