"""`read_scene`: shapes and colours read back from pixels, scored on rendered scenes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from megadual.data.scene_reader import read_scene
from megadual.data.scenes import COLOURS, Scene
from megadual.data.synthetic_images import render_scene, synthetic_sample


@pytest.mark.parametrize("size", [32, 64])
def test_reads_rendered_scenes(size):
    n = 96
    shapes = colours = backgrounds = 0
    for i in range(n):
        image, _, labels = synthetic_sample(11, i, size)
        reading = read_scene(image)
        shapes += reading.shape == labels["shape"]
        colours += reading.colour == labels["colour"]
        backgrounds += reading.background == labels["background"]
    assert colours == n and backgrounds == n
    # Small shapes at 32 px are ~5 pixels across: a diamond and a cross can blur together.
    assert shapes >= 0.95 * n


def test_every_shape_is_told_apart_at_each_size():
    for shape in ("circle", "square", "triangle", "diamond", "cross", "star"):
        for size in ("medium", "large"):
            scene = Scene(shape=shape, colour="red", size=size, position="center", background="blue")
            assert read_scene(render_scene(scene, 32)).shape == shape, (shape, size)


def test_plain_background_has_no_shape():
    image = Image.new("RGB", (32, 32), COLOURS["green"])
    reading = read_scene(image)
    assert reading.shape is None and reading.colour is None and reading.background == "green"


def test_rejects_a_non_square_or_grey_image():
    with pytest.raises(ValueError, match=r"square RGB image"):
        read_scene(np.zeros((32, 16, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"square RGB image"):
        read_scene(np.zeros((32, 32), dtype=np.uint8))
