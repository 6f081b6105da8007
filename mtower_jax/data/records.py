"""The record schemas every builder writes, and the text index the pipelines read.

A record holds one image (or one image pair, NLVR2) and *all* the texts that go with it, so
image bytes are stored once however many captions or questions refer to them. Images are
kept as the original encoded bytes (JPEG/PNG) and decoded in the pipeline, where a corrupt
file is skipped and counted rather than crashing the run.

An epoch visits every (record, text) pair. `text_index(builder, split)` gives the number of
texts of each record in on-disk order; it is computed once after the build (one pass over
the split) and cached next to the shards as `<split>.num_texts.npy`.

Schemas (lists are aligned with `texts`):

    captions   image, image_id, texts                                   (pretraining, retrieval)
    vqa        image, image_id, texts (questions), question_id [n],
               answer_labels [n, MAX_ANSWERS] (-1 padded), answer_scores [n, MAX_ANSWERS]
    nlvr2      image, image_2, image_id, texts, labels [n] (1 = True), text_ids (identifiers)
    snli_ve    image, image_id, texts (hypotheses), labels [n] (SNLI_VE_LABELS)
"""
import os

import numpy as np
import tensorflow_datasets as tfds

# The most distinct answers one VQA question can carry: VQAv2 has 10 annotators.
MAX_ANSWERS = 10
SNLI_VE_LABELS = ("entailment", "neutral", "contradiction")

# Encoded image bytes, stored verbatim (no re-encoding, no TensorFlow needed).
_IMAGE = tfds.features.Tensor(shape=(), dtype=np.object_)


def _features(**extra) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(dict(
        image=_IMAGE, image_id=tfds.features.Text(),
        texts=tfds.features.Sequence(tfds.features.Text()), **extra))


def caption_features() -> tfds.features.FeaturesDict:
    return _features()


def vqa_features() -> tfds.features.FeaturesDict:
    return _features(
        question_id=tfds.features.Tensor(shape=(None,), dtype=np.int64),
        answer_labels=tfds.features.Tensor(shape=(None, MAX_ANSWERS), dtype=np.int32),
        answer_scores=tfds.features.Tensor(shape=(None, MAX_ANSWERS), dtype=np.float32))


def nlvr2_features() -> tfds.features.FeaturesDict:
    return _features(image_2=_IMAGE,
                     labels=tfds.features.Tensor(shape=(None,), dtype=np.int32),
                     text_ids=tfds.features.Sequence(tfds.features.Text()))


def snli_ve_features() -> tfds.features.FeaturesDict:
    return _features(labels=tfds.features.Tensor(shape=(None,), dtype=np.int32))


SCHEMAS = dict(captions=caption_features, vqa=vqa_features, nlvr2=nlvr2_features,
               snli_ve=snli_ve_features)


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """A DatasetInfo that never looks in tfds' GCS bucket: our datasets are built locally.
    tfds' `initialize_from_bucket`, called for every builder of a not-yet-built directory,
    makes a `/tmp/tmp*tfds` directory it never removes (~1,150 per `make test`)."""

    def initialize_from_bucket(self) -> None:
        pass


def dataset_info(builder: tfds.core.DatasetBuilder, schema: str) -> tfds.core.DatasetInfo:
    """The DatasetInfo of a builder writing records of `schema` (a key of SCHEMAS)."""
    return _LocalDatasetInfo(builder=builder, description=builder.__doc__,
                             features=SCHEMAS[schema]())


def vqa_answer_arrays(labels: list[int], scores: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Pads one question's (answer id, soft score) lists to [MAX_ANSWERS] with -1 / 0."""
    if len(labels) > MAX_ANSWERS:
        raise ValueError(f"{len(labels)} distinct answers > MAX_ANSWERS={MAX_ANSWERS}")
    out_labels = np.full((MAX_ANSWERS,), -1, np.int32)
    out_scores = np.zeros((MAX_ANSWERS,), np.float32)
    out_labels[:len(labels)] = labels
    out_scores[:len(scores)] = scores
    return out_labels, out_scores


def _index_path(builder: tfds.core.DatasetBuilder, split: str) -> str:
    return os.path.join(builder.data_dir, f"{split}.num_texts.npy")


def write_text_index(builder: tfds.core.DatasetBuilder) -> None:
    """One pass over every split of a built dataset; caches texts-per-record counts."""
    for split, source in builder.as_data_source().items():
        counts = np.array([len(source[i]["texts"]) for i in range(len(source))], np.int32)
        np.save(_index_path(builder, split), counts)


def text_index(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
    """[num_records] int32: how many texts each record of `split` holds, in on-disk order."""
    path = _index_path(builder, split)
    if not os.path.exists(path):
        write_text_index(builder)
    return np.load(path)
