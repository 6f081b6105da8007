"""examples.batch_spec describes exactly what the pipeline yields (keys, shapes, dtypes):
tools/aot.py compiles the train step against it without reading any data."""
import numpy as np
import pytest

from mtower_jax.data import pipeline
from mtower_jax.data.examples import batch_spec
from tests import test_pipeline
from tests.test_pipeline import config_for

data_dir = test_pipeline.data_dir  # the synthetic world, built once for this module

# (config.task, config.data overrides, model overrides): every task, both ITM negative kinds.
CASES = {
    "pretrain": ("pretrain", {}, {}),
    "pretrain_dataset_negatives": ("pretrain", {"itm_negatives": "dataset"}, {}),
    "vqa": ("vqa", {}, {"vqa_num_answers": 16}),  # the shapes world's answers
    "nlvr2": ("nlvr2", {}, {}),
    "snli_ve": ("snli_ve", {}, {}),
    "retrieval": ("retrieval", {}, {}),
}


@pytest.mark.parametrize("case", CASES)
def test_batch_spec_matches_a_pipeline_batch(data_dir, case):
    task, data, model = CASES[case]
    config = config_for(data_dir, **data)
    config.task = task
    config.model.update(model)
    batch = next(iter(pipeline.task_data(config, task, "train", train=True)))
    spec = batch_spec(config, config.batch_size)
    assert sorted(spec) == sorted(batch)
    for key, value in batch.items():
        assert (spec[key].shape, spec[key].dtype) == (value.shape, np.dtype(value.dtype)), key
