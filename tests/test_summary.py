"""Parameter counts against the reference implementations, and the summary CLI."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from mtower_jax.models import model_config
from mtower_jax.summary import parameter_table

ROOT = pathlib.Path(__file__).resolve().parents[1]

# At image size 288, derived from the HF BridgeTowerModel and the official ManagerTower code.
BRIDGE_BASE = 325_756_416
MANAGERS_BASE = 12_062_280


def backbone(size: str, tower: str, **manager) -> tuple[dict, int]:
    cfg = model_config(size, tower)
    cfg.manager.update(manager)
    rows, heads, total = parameter_table(cfg)
    return dict(rows), total


def test_bridge_base_matches_reference():
    rows, total = backbone("base", "bridge")
    assert total == BRIDGE_BASE
    assert rows["text encoder"] == 124_055_040  # RoBERTa-base without its pooler
    assert rows["vision encoder"] == 85_897_728  # ViT-B/16 at 288 px
    assert rows["cross-modal text layers"] == rows["cross-modal image layers"] == 56_710_656
    # Link towers (5 per stream) plus the first-layer LayerNorm of each stream.
    assert rows["text bridges"] + rows["image bridges"] == 18_432


def test_manager_base_matches_reference():
    rows, total = backbone("base", "manager")
    assert total == 337_818_696 == BRIDGE_BASE + MANAGERS_BASE
    # Per stream: a first-layer SAUE (13,825), five AAUEs (1,203,463) and 12 layer embeddings.
    assert rows["text managers"] == rows["image managers"] == 13_825 + 5 * 1_203_463 + 12 * 768


@pytest.mark.parametrize("size, tower, total", [
    ("base", "meter", 325_737_984),
    ("large", "bridge", 863_464_448),
    ("large", "manager", 884_814_920),
    ("large", "meter", 863_439_872),
])
def test_documented_counts(size, tower, total):
    assert backbone(size, tower)[1] == total
    assert f"{total:,}" in (ROOT / "README.md").read_text()


def test_manager_ablation_sizes():
    # SAUE everywhere: layer 1 as before, layers 2..6 hold (N+1) weight vectors and LayerNorms.
    _, saue = backbone("base", "manager", type="SAUE")
    per_stream = 13_825 + 5 * (7 * 768 + 7 * 2 * 768 + 1)
    assert saue == BRIDGE_BASE + 2 * per_stream
    _, scalar = backbone("base", "manager", weight_type="scalar")
    assert scalar == 337_818_696 - 2 * (6 * 767 + 5 * 767)  # one weight instead of 768 each


def test_summary_cli():
    result = subprocess.run(
        [sys.executable, "-m", "mtower_jax.summary",
         "--config=configs/pretrain.py:model=base,tower=bridge"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"total_params: {BRIDGE_BASE}"
    assert any(line.startswith("text bridges") for line in lines)


def test_summary_cli_rejects_bad_values():
    result = subprocess.run(
        [sys.executable, "-m", "mtower_jax.summary", "--config=configs/pretrain.py:model=tiny",
         "--config.model.manager.num_layers=9"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "model.manager.num_layers=9" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "mtower_jax.summary", "--config=configs/pretrain.py:model=tiny",
         "--config.model.manger.num_layers=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "manger" in result.stderr
