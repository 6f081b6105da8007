"""Image-text retrieval fine-tuning (Flickr30K or COCO, Karpathy splits): ITC + ITM with hard
negatives from the ITC similarities of the whole global batch; evaluation ranks every pair
by ITC, re-ranks each query's top k (128 F30K, 256 COCO) by ITM and reports IR / TR R@1/5/10.

    python -m mtower_jax.main --config=configs/irtr.py:model=tiny,data=synthetic --workdir=runs/irtr

Arguments: model tiny | small | base | large, tower manager | bridge | meter,
data synthetic | real, dataset f30k | coco (real data: the f30k_retrieval / coco_retrieval
builder under config.data.data_dir).
"""
from mtower_jax.recipes import finetune_config


def get_config(arg: str | None = None):
    return finetune_config("retrieval", arg, dataset="f30k")
