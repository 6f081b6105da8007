"""Image transforms, RandAugment, MLM masking statistics, the left/right swap."""
import numpy as np
import pytest
from PIL import Image

from mtower_jax.data import image_transforms as T
from mtower_jax.data import masking, randaugment
from mtower_jax.data.examples import swap_left_right


def _gradient_image(w: int, h: int) -> Image.Image:
    """R encodes x, G encodes y: lets a test see which window a crop took."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8))


def test_normalize_uses_clip_statistics():
    mean_image = Image.fromarray(np.full((4, 4, 3), np.round(T.CLIP_MEAN * 255), np.uint8))
    assert np.abs(T.normalize(mean_image)).max() < 0.01
    white = T.normalize(Image.new("RGB", (2, 2), (255, 255, 255)))
    np.testing.assert_allclose(white[0, 0], (1 - T.CLIP_MEAN) / T.CLIP_STD, rtol=1e-6)


def test_pretrain_crop_is_centered_and_eval_keeps_the_whole_image():
    image = _gradient_image(200, 100)
    crop = np.asarray(T.resize_center_crop(image, 50), np.float32)
    assert crop.shape == (50, 50, 3)
    assert abs(crop[:, :, 0].mean() - 127.5) < 3  # the middle of the x range
    assert crop[:, :, 0].min() > 50 and crop[:, :, 0].max() < 205  # the sides are cut
    whole = np.asarray(T.resize_square(image, 50), np.float32)
    assert whole[:, :, 0].min() < 5 and whole[:, :, 0].max() > 250


def test_random_resized_crop_is_seeded_and_covers_half_to_all_of_the_area():
    image = _gradient_image(256, 256)
    a = T.random_resized_crop(image, 32, np.random.default_rng(1))
    b = T.random_resized_crop(image, 32, np.random.default_rng(1))
    assert a.size == (32, 32) and np.array_equal(np.asarray(a), np.asarray(b))
    spans = []
    for seed in range(200):
        crop = np.asarray(T.random_resized_crop(image, 32, np.random.default_rng(seed)), float)
        spans.append((np.ptp(crop[:, :, 0]) + 8) * (np.ptp(crop[:, :, 1]) + 8) / 255 ** 2)
    # Area fraction ~ U(0.5, 1), seen through the pixel ranges (+8: one source pixel each).
    assert 0.45 < min(spans) < 0.6 and max(spans) > 0.9


@pytest.mark.parametrize("mode", T.MODES)
def test_transform_modes_give_normalized_square_float32(mode):
    out = T.transform(_gradient_image(70, 50), 32, mode, np.random.default_rng(0), flip=True)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    with pytest.raises(ValueError, match="unknown image transform mode"):
        T.transform(_gradient_image(8, 8), 8, "train")


@pytest.mark.parametrize("op", sorted(randaugment.OPS))
def test_each_randaugment_op_keeps_size_and_mode(op):
    image = _gradient_image(40, 30)
    out = randaugment.OPS[op](image, 0.7, np.random.default_rng(0))
    assert out.size == image.size and out.mode == "RGB"


def test_randaugment_is_seeded_and_changes_the_image():
    image = _gradient_image(40, 30)
    outs = [np.asarray(randaugment.rand_augment(image, np.random.default_rng(s)))
            for s in (0, 0, 1, 2, 3)]
    assert np.array_equal(outs[0], outs[1])
    assert sum(not np.array_equal(o, np.asarray(image)) for o in outs[2:]) >= 2


def test_decode_rejects_truncated_bytes(tmp_path):
    path = tmp_path / "x.jpg"
    _gradient_image(64, 64).save(path)
    data = path.read_bytes()
    assert T.decode(data).size == (64, 64)
    with pytest.raises(OSError):
        T.decode(data[: len(data) // 2])


def test_swap_left_right_keeps_case_and_whole_words():
    assert swap_left_right("Left of the red circle, right above; leftover") == \
        "Right of the red circle, left above; leftover"


def test_mlm_masking_statistics_follow_bert():
    rng = np.random.default_rng(0)
    batch, length, vocab, mask_id = 4000, 40, 1000, 999
    ids = rng.integers(5, 999, size=(batch, length))
    lengths = rng.integers(5, length + 1, size=batch)
    special = np.arange(length)[None] >= lengths[:, None] - 1  # </s> and padding
    special[:, 0] = True  # <s>
    ordinary = masking.ordinary_ids(vocab, [0, 1, 2, 3, mask_id])
    masked, labels = masking.mask_tokens(ids, special, mask_id=mask_id, ordinary_ids=ordinary,
                                         probability=0.15, rng=rng)
    selected = labels != masking.IGNORE
    assert not selected[special].any() and np.array_equal(masked[special], ids[special])
    assert abs(selected.sum() / (~special).sum() - 0.15) < 0.005
    np.testing.assert_array_equal(labels[selected], ids[selected])
    as_mask = (masked == mask_id) & selected
    unchanged = (masked == ids) & selected
    randomised = selected & ~as_mask & ~unchanged
    n = selected.sum()
    assert abs(as_mask.sum() / n - 0.8) < 0.01
    assert abs(unchanged.sum() / n - 0.1) < 0.01  # (a random draw equal to itself: 1e-3)
    assert abs(randomised.sum() / n - 0.1) < 0.01
    assert not np.isin(masked[randomised], [0, 1, 2, 3, mask_id]).any()
    assert masked.dtype == labels.dtype == np.int32


def test_mlm_cap_keeps_at_most_k_and_lists_their_positions():
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, size=(4000, 40))
    special = np.zeros(ids.shape, bool)
    special[:, 0] = special[:, -1] = True
    kw = dict(mask_id=4, ordinary_ids=np.arange(5, 100), probability=0.3)
    uncapped = masking.mask_tokens(ids, special, rng=np.random.default_rng(1), **kw)
    k = masking.max_predictions(0, 0.3, 40)
    assert k == 24 and masking.max_predictions(-1, 0.3, 40) is None
    assert masking.max_predictions(50, 0.3, 40) == 40
    with pytest.raises(ValueError, match="mlm_max_predictions=-2"):
        masking.max_predictions(-2, 0.3, 40)
    # The auto cap binds on no row here: the draws (and so the result) are the uncapped ones.
    capped = masking.mask_tokens(ids, special, rng=np.random.default_rng(1), max_predictions=k,
                                 **kw)
    for a, b in zip(uncapped, capped):
        np.testing.assert_array_equal(a, b)
    # A binding cap: at most 8 per row, drawn among that row's uncapped selections.
    masked, labels = masking.mask_tokens(ids, special, rng=np.random.default_rng(1),
                                         max_predictions=8, **kw)
    selected, before = labels != masking.IGNORE, uncapped[1] != masking.IGNORE
    assert selected.sum(-1).max() == 8 and not (selected & ~before).any()
    np.testing.assert_array_equal(masked[~selected], ids[~selected])  # unselected: untouched
    kept = selected.sum(-1) < before.sum(-1)  # truncated rows keep uniformly drawn positions
    first_half = selected[kept][:, 1:20].sum() / selected[kept].sum()
    assert abs(first_half - 0.5) < 0.03
    positions = masking.selected_positions(labels, 8)
    for row in range(50):
        where = np.flatnonzero(selected[row])
        np.testing.assert_array_equal(positions[row, :len(where)], where)
        assert (positions[row, len(where):] == 0).all()
    assert (np.take_along_axis(labels, positions, -1) != masking.IGNORE).sum() == selected.sum()
