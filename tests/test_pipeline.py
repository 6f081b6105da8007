"""Grain pipelines over the synthetic world: features per task, determinism, exact resume,
disjoint per-process slices, bad images skipped and counted, clear errors for missing data."""
import math

import numpy as np
import pytest

from configs.pretrain import get_config
from mtower_jax.data import pipeline, records
from mtower_jax.data.bad_records import DataError
from mtower_jax.data.builders.synthetic_shapes import ensure_built
from mtower_jax.data.masking import IGNORE
from mtower_jax.train.evaluation import Evaluator


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def config_for(data_dir: str, **data):
    config = get_config("model=tiny")
    config.unlock()
    config.data.data_dir = data_dir
    config.batch_size = 8
    config.data.update(data)
    return config


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_pretrain_batches_follow_the_model_contract(data_dir):
    config = config_for(data_dir)
    batch = next(iter(pipeline.pretrain_data(config, train=True)))
    size, length = config.model.vision.image_size, config.model.max_text_len
    assert batch["pixel_values"].shape == (8, size, size, 3)
    assert batch["pixel_values"].dtype == np.float32
    for key in ("input_ids", "attention_mask", "mlm_input_ids", "mlm_labels"):
        assert batch[key].shape == (8, length) and batch[key].dtype == np.int32
    assert (batch["input_ids"][:, 0] == 0).all()  # <s>
    masked = batch["mlm_labels"] != IGNORE
    assert masked.any()
    np.testing.assert_array_equal(batch["mlm_labels"][masked], batch["input_ids"][masked])
    assert not masked[batch["attention_mask"] == 0].any()
    k = math.ceil(2 * 0.15 * length)  # the auto cap
    assert batch["mlm_positions"].shape == (8, k) and batch["mlm_positions"].dtype == np.int32
    gathered = np.take_along_axis(batch["mlm_labels"], batch["mlm_positions"], -1)
    assert (gathered != IGNORE).sum() == masked.sum()  # every masked token is listed


def test_order_is_deterministic_and_resumes_exactly(data_dir):
    config = config_for(data_dir)
    first = take(iter(pipeline.pretrain_data(config, train=True)), 6)
    again = iter(pipeline.pretrain_data(config, train=True))
    assert_batches_equal(take(again, 3), first[:3])
    state = again.get_state()
    resumed = iter(pipeline.pretrain_data(config, train=True))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 3), first[3:])
    config.seed = 1
    other = next(iter(pipeline.pretrain_data(config, train=True)))
    assert not np.array_equal(other["text_index"], first[0]["text_index"])


def test_process_slices_are_disjoint_and_cover_each_epoch_once(data_dir):
    config = config_for(data_dir)
    config.batch_size = 16
    total = int(records.text_index(ensure_built("captions", data_dir, image_size=32), "val")
                .sum())
    seen = []
    for p in range(2):
        it = iter(pipeline.pretrain_data(config, "val", train=False, process_index=p,
                                         process_count=2))
        seen.append(np.concatenate([b["text_index"] for b in it]))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(total))
    # One process with the same global positions sees the same examples, same features.
    single = next(iter(pipeline.pretrain_data(config, "val", train=False)))
    two = next(iter(pipeline.pretrain_data(config, "val", train=False, process_index=1,
                                           process_count=2)))
    np.testing.assert_array_equal(two["mlm_input_ids"], single["mlm_input_ids"][1::2])


def test_train_global_batch_is_the_same_whatever_the_process_count(data_dir):
    config = config_for(data_dir)
    config.batch_size = 8
    single = take(iter(pipeline.pretrain_data(config, train=True)), 3)
    parts = [take(iter(pipeline.pretrain_data(config, train=True, process_index=p,
                                              process_count=2)), 3) for p in range(2)]
    for step, whole in enumerate(single):
        joined = {k: np.concatenate([parts[0][step][k], parts[1][step][k]]) for k in whole}
        assert_batches_equal([joined], [whole])
    # `start` (resuming on another process count) begins at that global position.
    later = take(iter(pipeline.pretrain_data(config, train=True, start=16, process_index=1,
                                             process_count=2)), 1)
    assert_batches_equal(later, [parts[1][2]])


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "snli_ve", "retrieval"])
def test_finetuning_tasks(data_dir, task):
    config = config_for(data_dir)
    config.model.vqa_num_answers = 16  # the shapes world's answers
    fn = getattr(pipeline, f"{task}_data")
    split = dict(vqa="val", nlvr2="dev", snli_ve="dev", retrieval="val")[task]
    train = next(iter(fn(config, train=True)))
    batch = next(iter(fn(config, split, train=False)))
    assert train["pixel_values"].shape == batch["pixel_values"].shape
    if task == "vqa":
        targets = batch["vqa_targets"]
        assert targets.shape[0] == 8 and targets.max() == 1.0
        assert np.isin(targets, np.float32([0.0, 0.3, 0.6, 0.9, 1.0])).all()
        assert batch["question_id"].dtype == np.int64
    elif task == "nlvr2":
        assert batch["pixel_values_2"].shape == batch["pixel_values"].shape
        assert set(np.unique(batch["labels"])) <= {0, 1}
    elif task == "snli_ve":
        assert set(np.unique(batch["labels"])) <= {0, 1, 2}
    else:  # retrieval evaluation walks images and captions in order
        np.testing.assert_array_equal(batch["text_index"], np.arange(8))
        np.testing.assert_array_equal(batch["record_index"], np.arange(8) // 5)


def test_dataset_itm_negatives_pair_half_the_texts_with_other_images(data_dir):
    config = config_for(data_dir, itm_negatives="dataset")
    config.batch_size = 64
    batch = next(iter(pipeline.pretrain_data(config, train=True)))
    labels = batch["itm_labels"]
    assert 0.25 < labels.mean() < 0.75
    same = np.all(batch["itm_pixel_values"] == batch["pixel_values"], axis=(1, 2, 3))
    np.testing.assert_array_equal(same[labels == 1], True)
    assert not same[labels == 0].all()


def test_corrupt_images_are_skipped_counted_and_fail_past_the_threshold(data_dir, tmp_path):
    """Truncate one image in the built shards' source: rebuild a copy whose record 0 is bad."""
    builder = ensure_built("captions", data_dir, image_size=32)
    source = builder.as_data_source()["val"]
    index = pipeline.SplitIndex.build([(_CorruptFirst(source), records.text_index(builder,
                                                                                  "val"))])
    config = config_for(data_dir)
    spec = pipeline.examples.TaskSpec(task="pretrain", tokenizer=pipeline.tokenizer_for(
        config.data), image_size=32, max_text_len=32, image_mode="pretrain")
    ds = pipeline.make_dataset(index, spec, batch_size=8, seed=0, train=False, what="t",
                               max_skipped_fraction=0.5)
    seen = np.concatenate([b["record_index"] for b in ds])
    assert 0 not in seen and len(seen) == len(index) - records.text_index(builder, "val")[0]
    strict = pipeline.make_dataset(index, spec, batch_size=8, seed=0, train=False, what="t",
                                   max_skipped_fraction=0.0)
    with pytest.raises(DataError, match="max_skipped_fraction"):
        for _ in strict:
            pass


class _CorruptFirst:
    """A data source whose record 0 has a truncated image (as a damaged shard would)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        record = dict(self.source[i])
        if i == 0:
            record["image"] = record["image"][:40]
        return record


def test_missing_or_unbuilt_data_says_how_to_build_it(tmp_path):
    config = get_config("model=tiny,data=real")
    config.unlock()
    config.data.data_dir = str(tmp_path / "nope")
    with pytest.raises(DataError, match="is not a directory"):
        pipeline.pretrain_data(config, train=True)
    config.data.data_dir = str(tmp_path)
    with pytest.raises(DataError, match="python -m mtower_jax.data.build coco_captions"):
        pipeline.pretrain_data(config, train=True)


def test_a_missing_split_is_named_when_the_evaluator_is_made(data_dir):
    config = config_for(data_dir)
    pipeline.check_splits(config, "pretrain", ("train", "val"))
    config.data.eval_splits = ("val", "nope")
    message = r"no dataset has a split 'nope': 'synthetic_shapes' has \['train', 'val'\]"
    with pytest.raises(DataError, match=message):
        pipeline.check_splits(config, "pretrain", config.data.eval_splits)
    # The run makes its evaluator before the first step: the error comes then, not at the
    # first evaluation (before the model is touched, so none is needed here).
    with pytest.raises(DataError, match=message):
        Evaluator(config, model=None, mesh=None, workdir="")


def test_a_run_whose_data_is_missing_writes_nothing(data_dir, tmp_path):
    """The data a run reads is checked with its config, before DIR exists."""
    from mtower_jax.train import loop

    config = config_for(data_dir)
    config.data.eval_splits = ("nope",)
    for run in (loop.train, loop.evaluate_only):
        with pytest.raises(DataError, match="no dataset has a split 'nope'"):
            run(config, str(tmp_path / "run"))
    config.data.datasets, config.data.data_dir = ("coco_captions",), str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="is not a directory"):
        loop.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_grain_worker_processes_give_the_same_batches(data_dir):
    config = config_for(data_dir)
    expected = take(iter(pipeline.pretrain_data(config, train=True)), 3)
    config.data.num_workers = 2
    it = iter(pipeline.pretrain_data(config, train=True))
    assert_batches_equal(take(it, 3), expected)


def test_vqa_answer_count_must_match_the_head(data_dir):
    config = config_for(data_dir)  # pretrain config: model.vqa_num_answers = 3129
    with pytest.raises(DataError, match="has 16 VQA answers but model.vqa_num_answers=3129"):
        pipeline.vqa_data(config, train=True)


def test_one_text_per_record_walks_the_image_gallery(data_dir):
    config = config_for(data_dir)
    batch = next(iter(pipeline.retrieval_data(config, "val", train=False,
                                              one_text_per_record=True)))
    np.testing.assert_array_equal(batch["record_index"], np.arange(8))
    assert pipeline.num_examples(config, "retrieval", "val") == 5 * 200
