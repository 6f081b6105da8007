"""Image transforms (numpy / PIL), as the reference CLIP-based VL models use them.

    pretraining   resize the shorter side to S (bicubic), center crop S x S
    eval          resize to S x S (the whole image, aspect not kept)
    fine-tuning   RandomResizedCrop(S, scale 0.5-1) + horizontal flip (not for VQA)
                  + RandAugment(2, 7)

Every path ends in `normalize`: float32 [S, S, 3] in CLIP's mean/std, the layout the vision
encoder takes (`pixel_values [B, H, W, 3]`).
"""
import io
import math

import numpy as np
from PIL import Image, UnidentifiedImageError

from mtower_jax.data import randaugment

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
MODES = ("pretrain", "eval", "finetune")


class BadImage(OSError):
    """Bytes that do not decode as an image, whatever PIL raised (OSError, SyntaxError,
    DecompressionBombError...): the one error the pipeline and the builders count."""


def decode(data: bytes) -> Image.Image:
    """Encoded bytes -> RGB PIL image; BadImage on a corrupt file (the pipeline counts it)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # a full decode: catches truncated files that verify() lets through
        return image.convert("RGB")
    except UnidentifiedImageError:  # its message names a BytesIO's address: say it plainly
        raise BadImage("not in any image format Pillow reads") from None
    except Exception as e:  # PIL raises many types, not all OSError (a decompression bomb)
        raise BadImage(f"{type(e).__name__}: {e}") from e


def normalize(image: Image.Image) -> np.ndarray:
    """[H, W, 3] float32, (x / 255 - CLIP_MEAN) / CLIP_STD."""
    return (np.asarray(image, np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def resize_square(image: Image.Image, size: int) -> Image.Image:
    return image.resize((size, size), Image.BICUBIC)


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.5, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop: area fraction ~ U(scale), log-aspect ~ U(log ratio);
    10 tries, then a center crop clamped to the ratio range."""
    w, h = image.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return image.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    aspect = w / h
    cw, ch = (w, round(w / ratio[0])) if aspect < ratio[0] else (
        (round(h * ratio[1]), h) if aspect > ratio[1] else (w, h))
    cw, ch = min(cw, w), min(ch, h)
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))


def transform(image: Image.Image, size: int, mode: str, rng: np.random.Generator | None = None,
              flip: bool = False) -> np.ndarray:
    """One image through the `mode` path ('pretrain' | 'eval' | 'finetune') -> [S, S, 3].

    `flip` (fine-tuning only) is decided by the caller, which must also swap 'left'/'right'
    in the text so the pair stays true.
    """
    if mode == "pretrain":
        image = resize_center_crop(image, size)
    elif mode == "eval":
        image = resize_square(image, size)
    elif mode == "finetune":
        image = random_resized_crop(image, size, rng)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image = randaugment.rand_augment(image, rng, num_ops=2, magnitude=7)
    else:
        raise ValueError(f"unknown image transform mode {mode!r}; choose from {MODES}")
    return normalize(image)
