"""tools/forward.py: the smoke test of a whole model that needs no data."""
from configs.pretrain import get_config
from mtower_jax.tools import forward


def test_reports_every_output_with_its_shape_and_the_manager_weights():
    cfg = get_config("model=tiny").model
    report = forward.describe(cfg, batch_size=2).splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in report[1:] if line.startswith("  ") and
            not line.startswith("    ") and "manager weights" not in line}
    assert rows["itm_logits"][:2] == ["(2,", "2)"]
    # Per-layer hidden states are tuples: reported as k x shape.
    assert " ".join(rows["text_hidden_states"][:4]) == "4 x (2, 32,"
    assert " ".join(rows["cross_image_hidden_states"][:4]) == "2 x (2, 17,"
    layers = [line for line in report if line.startswith("    layer ")]
    assert len(layers) == 2 * cfg.cross.num_layers  # text and image, one row per cross layer
    for line in layers:  # each row is a softmax over the N managed layers
        weights = [float(w) for w in line.split(":")[1].split()]
        assert len(weights) == cfg.manager.num_layers and abs(sum(weights) - 1) < 2e-3
