"""Read a synthetic scene's shape and colours back from its pixels (the held-out image checker).

`parse_caption` judges text against the scene grammar; `read_scene` is its counterpart for
images: given only an RGB image (a rendered scene, a reconstruction, or a generated image),
it says which shape of which colour is drawn on which background, from pixel statistics:

1. background: a plane per channel fitted to the border pixels (the renderer's background is
   a linear gradient; the shape rarely reaches the border), named by its nearest palette colour
   (the shape colours and the background's grey);
2. shape colour: the shape colour (other than the background's) nearest to the pixels that
   differ most from the background;
3. coverage: each pixel's position between background and shape colour, in [0, 1]: what
   fraction of the pixel the shape covers (the renderer anti-aliases by box filtering);
4. shape: every shape's coverage template, placed by the coverage's centroid and scaled to its
   area, then nudged over a small grid of offsets and scales; the best least-squares fit wins;
5. side: the half of the image that holds the coverage's centroid.

A reading that finds no pixel far enough from the background says so (shape None).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
from PIL import Image

from .scenes import BACKGROUND, BACKGROUND_RGB, COLOURS, SHAPES
from .synthetic_images import shape_coverage

# A pixel this far (RGB distance, 8-bit levels) from the fitted background is shape for sure;
# the background gradient itself stays within ~21 levels of the plane fit.
MIN_SHAPE_CONTRAST = 40.0
# Search around the moment-based placement: centre offsets (pixels) and radius scales.
_OFFSETS = (-0.5, 0.0, 0.5)
_SCALES = (0.8, 0.9, 1.0, 1.1, 1.2)
_MOMENT_FLOOR = 0.25  # coverage below this is treated as background when placing templates
_PALETTE_NAMES = (*sorted(COLOURS), BACKGROUND)
_PALETTE = np.array([COLOURS.get(c, BACKGROUND_RGB) for c in _PALETTE_NAMES], dtype=np.float64)


@dataclass(frozen=True)
class SceneReading:
    """What `read_scene` saw. `shape`/`colour`/`side` are None when no shape stands out."""

    shape: Optional[str]
    colour: Optional[str]
    background: str
    fit_error: float  # mean squared coverage error of the winning template (0 = exact)
    side: Optional[str] = None


def _nearest_colour(rgb: np.ndarray, exclude: Optional[str] = None, shape_colour: bool = False) -> str:
    distances = np.linalg.norm(_PALETTE - rgb, axis=1)
    if exclude is not None:
        distances[_PALETTE_NAMES.index(exclude)] = np.inf
    if shape_colour:  # a shape is never drawn in the background's grey
        distances[_PALETTE_NAMES.index(BACKGROUND)] = np.inf
    return _PALETTE_NAMES[int(np.argmin(distances))]


def _background_plane(image: np.ndarray) -> np.ndarray:
    """[S, S, 3] background model: a least-squares plane per channel through the border pixels."""
    size = image.shape[0]
    ys, xs = np.mgrid[0:size, 0:size]
    border = np.zeros((size, size), dtype=bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    design = np.stack([np.ones(border.sum()), xs[border], ys[border]], axis=1)
    # Robust to a shape touching the border: refit without the worst tenth of the border pixels.
    coef, *_ = np.linalg.lstsq(design, image[border], rcond=None)
    residual = np.linalg.norm(design @ coef - image[border], axis=1)
    keep = residual <= np.quantile(residual, 0.9)
    coef, *_ = np.linalg.lstsq(design[keep], image[border][keep], rcond=None)
    full = np.stack([np.ones(size * size), xs.ravel(), ys.ravel()], axis=1)
    return (full @ coef).reshape(size, size, 3)


@functools.lru_cache(maxsize=None)
def _unit_geometry(shape: str) -> tuple[float, float, float]:
    """(area, centroid dx, centroid dy) of `shape` drawn with half-extent 1, from a large rendering."""
    size, r = 256, 100.0
    cover = np.asarray(shape_coverage(shape, size, size / 2, size / 2, r), dtype=np.float64) / 255.0
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    area = cover.sum()
    return (area / r**2, ((cover * xs).sum() / area - size / 2) / r, ((cover * ys).sum() / area - size / 2) / r)


def _template(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    return np.asarray(shape_coverage(shape, size, cx, cy, r), dtype=np.float64) / 255.0


def read_scene(image: Union[Image.Image, np.ndarray]) -> SceneReading:
    """Shape, shape colour and background colour of a square RGB scene image (see module doc).

    Args:
        image: a PIL image or a uint8 array [S, S, 3].
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] != pixels.shape[1]:
        raise ValueError(f"read_scene: expected a square RGB image [S, S, 3], got shape {pixels.shape}")
    size = pixels.shape[0]
    plane = _background_plane(pixels)
    background = _nearest_colour(np.median(plane.reshape(-1, 3), axis=0))
    contrast = np.linalg.norm(pixels - plane, axis=2)
    if contrast.max() < MIN_SHAPE_CONTRAST:
        return SceneReading(None, None, background, float("inf"))

    strongest = contrast >= max(MIN_SHAPE_CONTRAST, 0.7 * contrast.max())
    colour = _nearest_colour(np.median(pixels[strongest], axis=0), exclude=background, shape_colour=True)
    towards = _PALETTE[_PALETTE_NAMES.index(colour)] - plane  # [S, S, 3]: background -> shape colour
    coverage = np.clip(((pixels - plane) * towards).sum(axis=2) / np.maximum((towards**2).sum(axis=2), 1e-6), 0, 1)

    # Moments from clearly covered pixels only: the background's small residuals, summed over
    # the whole image, would otherwise inflate the area and pull the centroid to the middle.
    solid = np.where(coverage > _MOMENT_FLOOR, coverage, 0.0)
    area = solid.sum()
    if area == 0.0:  # contrast without a single pixel leaning to the shape colour: no shape drawn
        return SceneReading(None, colour, background, float("inf"))
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    mx, my = (solid * xs).sum() / area, (solid * ys).sum() / area
    best_shape, best_error = None, float("inf")
    for shape in SHAPES:
        unit_area, dx, dy = _unit_geometry(shape)
        r0 = float(np.sqrt(area / unit_area))
        for scale, ox, oy in itertools.product(_SCALES, _OFFSETS, _OFFSETS):
            r = r0 * scale
            error = float(np.mean((_template(shape, size, mx - dx * r + ox, my - dy * r + oy, r) - coverage) ** 2))
            if error < best_error:
                best_shape, best_error = shape, error
    side = "left" if mx < size / 2 else "right"
    return SceneReading(best_shape, colour, background, best_error, side)
