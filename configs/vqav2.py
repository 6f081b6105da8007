"""VQAv2 fine-tuning: BCE against soft answer scores over 3,129 answers; VQA accuracy on val,
a test-dev submission file (mtower_jax/recipes.py holds the recipe table).

    python -m mtower_jax.main --config=configs/vqav2.py:model=tiny,data=synthetic \
        --workdir=runs/vqa --config.init_from=runs/pretrain

Arguments: model tiny | small | base | large, tower manager | bridge | meter,
data synthetic | real (real: the vqav2 builder under config.data.data_dir).
"""
from mtower_jax.recipes import finetune_config


def get_config(arg: str | None = None):
    return finetune_config("vqa", arg)
