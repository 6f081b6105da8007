"""RandAugment(N, M) on PIL images (Cubuk et al. 2019), as used for VL fine-tuning.

N ops are drawn uniformly with replacement from OPS, each applied with magnitude M out of
10 (signed at random for the geometric and enhance ops). Ranges follow the common
timm/torchvision settings: rotate up to 30 degrees, shear up to 0.3, translate up to 45% of
the image size... scaled by M / 10. Colour inversion is left out, as in the VL reference
code: it changes the colours a caption may name.
"""
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_FILL = (128, 128, 128)


def _signed(magnitude: float, rng: np.random.Generator) -> float:
    return magnitude if rng.random() < 0.5 else -magnitude


def _affine(image: Image.Image, matrix: tuple) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, matrix, Image.BILINEAR, fillcolor=_FILL)


# Each op: (image, level in [0, 1], rng) -> image.
OPS = {
    "identity": lambda im, m, rng: im,
    "auto_contrast": lambda im, m, rng: ImageOps.autocontrast(im),
    "equalize": lambda im, m, rng: ImageOps.equalize(im),
    "rotate": lambda im, m, rng: im.rotate(_signed(30 * m, rng), Image.BILINEAR,
                                           fillcolor=_FILL),
    "solarize": lambda im, m, rng: ImageOps.solarize(im, int(256 - 256 * m)),
    "posterize": lambda im, m, rng: ImageOps.posterize(im, max(1, int(8 - 4 * m))),
    "color": lambda im, m, rng: ImageEnhance.Color(im).enhance(1 + _signed(0.9 * m, rng)),
    "contrast": lambda im, m, rng: ImageEnhance.Contrast(im).enhance(1 + _signed(0.9 * m, rng)),
    "brightness": lambda im, m, rng: ImageEnhance.Brightness(im).enhance(
        1 + _signed(0.9 * m, rng)),
    "sharpness": lambda im, m, rng: ImageEnhance.Sharpness(im).enhance(
        1 + _signed(0.9 * m, rng)),
    "shear_x": lambda im, m, rng: _affine(im, (1, _signed(0.3 * m, rng), 0, 0, 1, 0)),
    "shear_y": lambda im, m, rng: _affine(im, (1, 0, 0, _signed(0.3 * m, rng), 1, 0)),
    "translate_x": lambda im, m, rng: _affine(
        im, (1, 0, _signed(0.45 * m * im.size[0], rng), 0, 1, 0)),
    "translate_y": lambda im, m, rng: _affine(
        im, (1, 0, 0, 0, 1, _signed(0.45 * m * im.size[1], rng))),
}
_NAMES = tuple(OPS)


def rand_augment(image: Image.Image, rng: np.random.Generator, num_ops: int = 2,
                 magnitude: int = 7) -> Image.Image:
    """Applies `num_ops` random ops of strength `magnitude` / 10."""
    for index in rng.integers(0, len(_NAMES), size=num_ops):
        image = OPS[_NAMES[index]](image, magnitude / 10, rng)
    return image
