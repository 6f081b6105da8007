"""tools/plot_managers: heatmaps of the managers' weights averaged over an eval split."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import random_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_workdir(path, data_dir: str, tower: str = "manager", params: bool = True):
    """A run directory as training leaves it: config.json and (here) DIR/params."""
    import orbax.checkpoint as ocp

    from configs.pretrain import get_config

    config = get_config(f"model=tiny,tower={tower}")
    config.unlock()
    config.data.data_dir = data_dir
    config.batch_size = config.eval_batch_size = 8  # the tool uses eval_batch_size
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    if params:
        variables = random_variables(config.model)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(path, "params"), variables["params"])
    return config


def first_batches(config, num_batches: int) -> list[dict]:
    from mtower_jax.data import pipeline

    data = pipeline.task_data(config, "pretrain", "val", train=False, batch_size=8)
    return [batch for _, batch in zip(range(num_batches), data)]


def forward_weights(config, params, batches: list[dict]) -> list[dict]:
    """model.apply's manager weights of each batch (numpy)."""
    import jax

    from mtower_jax.models import build_model

    model = build_model(config.model)
    forward = jax.jit(lambda p, ids, mask, pixels: model.apply(
        {"params": p}, input_ids=ids, attention_mask=mask, pixel_values=pixels, train=False,
        return_manager_weights=True)["manager_weights"])
    return [jax.device_get(forward(params, batch["input_ids"], batch["attention_mask"],
                                   batch["pixel_values"])) for batch in batches]


def token_means(weights: list[dict], batches: list[dict], rows: list[int]) -> dict:
    """The average spelled out: every real token of the first `rows` examples of each batch
    ([layers, B, T, N] weights of the forward above), then the mean."""
    tokens = {"text": [], "image": []}
    for w, batch, keep in zip(weights, batches, rows):
        real = batch["attention_mask"][:keep].astype(bool)  # [B, T]
        tokens["text"].append(np.moveaxis(w["text"][:, :keep], 0, 2)[real])  # [tokens, L, N]
        image = np.moveaxis(w["image"][:, :keep], 0, 2)  # [B, 1+P, L, N]
        tokens["image"].append(image.reshape(-1, *image.shape[2:]))
    return {stream: np.concatenate(rows).mean(axis=0, dtype=np.float64)
            for stream, rows in tokens.items()}


def test_writes_heatmaps_and_the_averaged_weights(tmp_path, monkeypatch):
    from PIL import Image

    from mtower_jax.data import pipeline
    from mtower_jax.tools import plot_managers
    from mtower_jax.train.init_from import read_params

    workdir = tmp_path / "run"
    config = write_workdir(str(workdir), str(tmp_path / "data"))
    paths = plot_managers.main(str(workdir), max_batches=2)
    names = ["manager_weights_text.png", "manager_weights_image.png", "manager_weights.json"]
    assert paths == [str(workdir / name) for name in names]
    for name in names[:2]:
        with Image.open(workdir / name) as image:
            assert image.format == "PNG"
            assert image.size[0] > 0 and image.size[1] > 0
            image.verify()

    summary = json.loads((workdir / "manager_weights.json").read_text())
    layers, n = config.model.cross.num_layers, config.model.manager.num_layers
    assert summary["rows"] == [str(i) for i in range(1, layers + 1)]
    # Tiny: 4-layer encoders, N = 3 managed layers -> uni-modal layers 2, 3, 4.
    assert summary["columns"] == {"text": ["2", "3", "4"], "image": ["2", "3", "4"]}
    assert summary["split"] == "val" and summary["task"] == "pretrain"
    params = read_params(str(workdir))
    batches = first_batches(config, 2)
    weights_of_batches = forward_weights(config, params, batches)
    expected = token_means(weights_of_batches, batches, [8, 8])
    for stream in ("text", "image"):
        weights = np.asarray(summary[stream])
        assert weights.shape == (layers, n)
        # A softmax over the N uni-modal experts (w_c of the previous cross layer is outside).
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(weights, expected[stream], atol=1e-5)
    # Layer 1 (SAUE) is static; layer 2 (AAUE) depends on the tokens, hence the streams differ.
    assert not np.allclose(summary["text"][1], summary["image"][1])

    # The command line does the same (one batch here) and prints the written paths.
    result = subprocess.run([sys.executable, "-m", "mtower_jax.tools.plot_managers",
                             f"--workdir={workdir}", "--split=val", "--max_batches=1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(workdir / name) for name in names]
    one_batch = json.loads((workdir / "manager_weights.json").read_text())
    assert one_batch["max_batches"] == 1
    np.testing.assert_allclose(one_batch["image"], token_means(weights_of_batches[:1],
                                                               batches[:1], [8])["image"],
                               atol=1e-5)

    # A short last batch (the end of a split) is padded to the jitted shape; the padding
    # rows must not count.
    short = [batches[0], {key: value[:3] for key, value in batches[1].items()}]
    monkeypatch.setattr(pipeline, "task_data", lambda *args, **kw: iter(short))
    padded = plot_managers.average_manager_weights(config, params, "val")
    expected = token_means(weights_of_batches, batches, [8, 3])
    for stream in ("text", "image"):
        np.testing.assert_allclose(padded[stream], expected[stream], atol=1e-5)


def test_refuses_towers_without_managers_and_missing_configs(tmp_path):
    from mtower_jax.tools import plot_managers

    write_workdir(str(tmp_path / "bridge"), str(tmp_path / "data"), tower="bridge", params=False)
    with pytest.raises(ValueError, match="'bridge'.*only the 'manager' tower"):
        plot_managers.main(str(tmp_path / "bridge"))
    with pytest.raises(ValueError, match="config.json does not exist"):
        plot_managers.main(str(tmp_path / "empty"))
    # The CLI turns both into a one-line error (exit status 1), before any model work.
    result = subprocess.run([sys.executable, "-m", "mtower_jax.tools.plot_managers",
                             f"--workdir={tmp_path / 'bridge'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "error: the run's model.tower is 'bridge'" in result.stderr
