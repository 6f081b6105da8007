"""NLVR2 fine-tuning: two passes per statement (image token types 1 and 2), the two cls
features concatenated -> true / false; accuracy on dev and test-P (split test1).

    python -m mtower_jax.main --config=configs/nlvr2.py:model=tiny,data=synthetic --workdir=runs/nlvr2

Arguments: model tiny | small | base | large, tower manager | bridge | meter,
data synthetic | real (real: the nlvr2 builder under config.data.data_dir).
"""
from mtower_jax.recipes import finetune_config


def get_config(arg: str | None = None):
    return finetune_config("nlvr2", arg)
