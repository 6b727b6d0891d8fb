"""`read_scene`: shapes and colours read back from pixels, scored on rendered scenes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from megadual.data.scene_reader import read_scene
from megadual.data.scenes import ATTRIBUTES, BACKGROUND, BACKGROUND_RGB, COLOURS, SHAPES, SIDES, Scene
from megadual.data.synthetic_images import render_scene, synthetic_sample


@pytest.mark.parametrize("size", [32, 64])
def test_reads_rendered_scenes(size):
    n = 96
    right = dict.fromkeys(ATTRIBUTES, 0)
    backgrounds = 0
    for i in range(n):
        image, _, labels = synthetic_sample(11, i, size, "all")
        reading = read_scene(image)
        for a in ATTRIBUTES:
            right[a] += getattr(reading, a) == labels[a]
        backgrounds += reading.background == BACKGROUND
    # The demo requires the checker to read >= 98% of each attribute on rendered originals.
    assert backgrounds == n and right["colour"] == n and right["side"] == n
    assert right["shape"] >= 0.98 * n


def test_every_shape_and_colour_is_told_apart():
    for shape in SHAPES:
        for colour in COLOURS:
            for side in SIDES:
                reading = read_scene(render_scene(Scene(shape, colour, side), 32, seed=5, index=3))
                assert (reading.shape, reading.colour, reading.side) == (shape, colour, side)


def test_plain_background_has_no_shape():
    reading = read_scene(Image.new("RGB", (32, 32), BACKGROUND_RGB))
    assert reading.shape is reading.colour is reading.side is None and reading.background == BACKGROUND


def test_rejects_a_non_square_or_grey_image():
    with pytest.raises(ValueError, match=r"square RGB image"):
        read_scene(np.zeros((32, 16, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"square RGB image"):
        read_scene(np.zeros((32, 32), dtype=np.uint8))
