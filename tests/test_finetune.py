"""A tiny fine-tune of every task on the synthetic world, through the real loop (train split ->
jitted steps -> the held-out split's evaluation -> eval_<split>.json): its metric must beat
chance. The model is the tiny config cut to one layer per stack so each task compiles in
seconds; then `--mode=eval` must reproduce the final evaluation from the checkpoint."""
import json

import pytest

from configs import irtr, nlvr2, snli_ve, vqav2
from mtower_jax.train import loop

# config module, steps, eval split, metric, chance level, the bar to pass
CASES = {
    # majority answer ('yes') scores 0.145 on val; the question type alone narrows the answers
    "vqa": (vqav2, 150, "val", "accuracy", 0.145, 0.25),
    "snli_ve": (snli_ve, 150, "dev", "accuracy", 1 / 3, 0.40),
    # two images against one statement: the slowest to leave chance (0.60 after 600 steps)
    "nlvr2": (nlvr2, 500, "dev", "accuracy", 0.5, 0.55),
    # r_mean of a random ranking of 200 images x 1000 captions is ~2.7% (10.0 after 500 steps)
    "retrieval": (irtr, 400, "val", "r_mean", 2.7, 5.0),
}
SHALLOW = {"text.num_layers": 1, "vision.num_layers": 1, "cross.num_layers": 1,
           "manager.num_layers": 1}


def finetune_config(task: str, data_dir: str):
    module, steps, split, _, _, _ = CASES[task]
    config = module.get_config("model=tiny")
    config.data.data_dir = data_dir
    config.data.eval_splits = (split,)
    config.total_steps, config.log_every, config.checkpoint_every = steps, 50, steps
    for key, value in SHALLOW.items():
        part, leaf = key.split(".")
        config.model[part][leaf] = value
    return config


@pytest.mark.parametrize("task", list(CASES))
def test_a_tiny_finetune_beats_chance(task, tmp_path_factory, caplog):
    data_dir = str(tmp_path_factory.getbasetemp() / "finetune_data")
    workdir = tmp_path_factory.mktemp(task)
    config = finetune_config(task, data_dir)
    _, steps, split, metric, chance, bar = CASES[task]
    loop.train(config, str(workdir))
    result = json.loads((workdir / f"eval_{split}.json").read_text())
    assert result["step"] == steps
    assert result[metric] > bar > chance, result
    if task == "vqa":  # the submission file answers every question of the split
        submission = json.loads((workdir / "vqa_submission_val.json").read_text())
        assert len(submission) == result["examples"]
        assert set(submission[0]) == {"question_id", "answer"}
    if task == "snli_ve":  # --mode=eval: the same numbers from the checkpoint
        (workdir / f"eval_{split}.json").unlink()
        with caplog.at_level("WARNING"):
            again = loop.evaluate_only(config, str(workdir))[split]
        assert again[metric] == pytest.approx(result[metric], abs=1e-6)
        assert json.loads((workdir / f"eval_{split}.json").read_text())["step"] == steps
        assert "differs from the one it was trained with" not in caplog.text
        # Another text length fits the same arrays: evaluated, with a warning that names it.
        config.model.max_text_len -= 8
        with caplog.at_level("WARNING"):
            loop.evaluate_only(config, str(workdir))
        length = config.model.max_text_len
        assert (f"model.max_text_len: {length + 8} -> {length}" in caplog.text
                and f"pass --config.model.max_text_len={length + 8}" in caplog.text)


def test_a_periodic_vqa_evaluation_leaves_the_submission_file_alone(tmp_path_factory):
    """eval_steps batches answer part of the split: only a whole evaluation writes the
    file a user uploads, so a run stopped after a periodic one leaves no partial file."""
    import flax.linen as nn
    import jax

    from conftest import random_variables
    from mtower_jax.models import build_model
    from mtower_jax.models.partitioning import resolve_rules
    from mtower_jax.train import mesh as mesh_lib
    from mtower_jax.train.evaluation import Evaluator

    workdir = tmp_path_factory.mktemp("vqa_periodic")
    config = finetune_config("vqa", str(tmp_path_factory.getbasetemp() / "finetune_data"))
    params = random_variables(config.model)["params"]
    mesh, rules = mesh_lib.make_mesh(config.mesh), resolve_rules(config.logical_axis_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        evaluator = Evaluator(config, build_model(config.model), mesh, str(workdir))
        partial = evaluator.evaluate(params, "val", max_batches=1)
        assert "submission" not in partial and not (workdir / "vqa_submission_val.json").exists()
        whole = evaluator.evaluate(params, "val")
    rows = json.loads((workdir / "vqa_submission_val.json").read_text())
    assert len(rows) == whole["examples"] > partial["examples"] > 0
