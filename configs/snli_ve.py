"""SNLI-VE fine-tuning: entailment / neutral / contradiction of a hypothesis given an image;
3-way cross-entropy, accuracy on dev and test.

    python -m mtower_jax.main --config=configs/snli_ve.py:model=tiny,data=synthetic --workdir=runs/ve

Arguments: model tiny | small | base | large, tower manager | bridge | meter,
data synthetic | real (real: the snli_ve builder under config.data.data_dir).
"""
from mtower_jax.recipes import finetune_config


def get_config(arg: str | None = None):
    return finetune_config("snli_ve", arg)
