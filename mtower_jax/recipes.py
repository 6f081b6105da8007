"""Fine-tuning recipes (DESIGN.md section 4) and the run config they make.

The `base` / `large` + `real` configs carry the paper's ManagerTower-base hyperparameters:

    task        image  lr      batch  epochs  warmup  wd    lr x head / x cross  head scale
    vqa         576    9e-6    504    10      0.1     0.06  50 / 5               2
    snli_ve     384    3e-6    64     4       0.06    0.01  10 / 5               2
    nlvr2       384    1.4e-5  256    5       0.1     0.01  10 / 5               1
    retrieval   384    6e-6    512    20      0.1     0.01  5 / 5                1

Augmentation (real data): random resized crop (scale 0.5-1), horizontal flip (not VQA),
RandAugment(2, 7); evaluation resizes to a square. Text length 40 for retrieval, 50 else.

`tiny` / `small` + `synthetic` keep the structure and shrink the budget so a laptop CPU runs
them in minutes: a uniform lr of 1e-3 (no head / cross-modal multipliers: these models start
nearly untrained, and at the paper's 50x the head saturates on answer priors before the
image is used), 16 text tokens (the world's questions and statements are at most 13), a
few epochs. The shapes world is about colours, counts and left / right: RandAugment's
colour operations and crops would change the answers, so synthetic data is not augmented.

Epochs become steps from the train split's size when the run starts (`total_steps=0`);
a positive `total_steps` overrides the epochs.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from mtower_jax.config_args import parse_arg
from mtower_jax.data.synthetic import world
from mtower_jax.models import model_config
from mtower_jax.models.config import SIZES
from mtower_jax.models.towers import TOWERS
from mtower_jax.train.mesh import mesh_config


@dataclasses.dataclass(frozen=True)
class Recipe:
    task: str  # a key of train.tasks.TASKS
    heads: tuple[str, ...]
    losses: tuple[str, ...]
    image_size: int
    lr: float
    batch_size: int
    epochs: float
    warmup_fraction: float
    weight_decay: float
    lr_multiplier_heads: float
    lr_multiplier_cross: float
    head_hidden_scale: float
    max_text_len: int
    flip: bool
    real_datasets: tuple[str, ...]
    train_split: str
    eval_splits: tuple[str, ...]


PAPER = dict(
    vqa=Recipe("vqa", ("vqa",), ("vqa",), 576, 9e-6, 504, 10, 0.1, 0.06, 50, 5, 2, 50, False,
               ("vqav2",), "train", ("val", "test_dev")),
    snli_ve=Recipe("snli_ve", ("snli_ve",), ("snli_ve",), 384, 3e-6, 64, 4, 0.06, 0.01, 10, 5,
                   2, 50, True, ("snli_ve",), "train", ("dev", "test")),
    nlvr2=Recipe("nlvr2", ("nlvr2",), ("nlvr2",), 384, 1.4e-5, 256, 5, 0.1, 0.01, 10, 5, 1, 50,
                 True, ("nlvr2",), "train", ("dev", "test1")),
    retrieval=Recipe("retrieval", ("itc", "itm"), ("itc", "itm"), 384, 6e-6, 512, 20, 0.1, 0.01,
                     5, 5, 1, 40, True, ("f30k_retrieval",), "train", ("val", "test")),
)
# Retrieval re-ranks each query's top k ITC candidates with ITM (DESIGN.md section 3).
RERANK_K = dict(f30k=128, coco=256)

# The tiny / small budget on the synthetic world: (lr, batch, epochs, max text length).
_SYNTHETIC_BUDGET = dict(vqa=(1e-3, 32, 10, 16), snli_ve=(1e-3, 32, 6, 16),
                         nlvr2=(1e-3, 32, 10, 16), retrieval=(1e-3, 32, 8, 32))


def finetune_config(task: str, arg: str | None, **extra_args) -> ml_collections.ConfigDict:
    """The config of fine-tuning task `task` for `arg` = 'model=..,tower=..,data=..' (plus
    `extra_args` defaults, e.g. retrieval's dataset)."""
    choices = dict(model=SIZES, tower=TOWERS, data=("synthetic", "real"))
    if "dataset" in extra_args:
        choices["dataset"] = tuple(RERANK_K)
    arg = parse_arg(arg, choices=choices, model="tiny", tower="manager", data="synthetic",
                    **extra_args)
    recipe, synthetic = PAPER[task], arg.data == "synthetic"
    paper = arg.model in ("base", "large") and not synthetic
    config = ml_collections.ConfigDict()
    config.task = task

    model = model_config(arg.model, arg.tower)
    model.heads = recipe.heads
    model.head_hidden_scale = float(recipe.head_hidden_scale)
    if paper:  # tiny / small keep their preset image size
        model.vision.image_size = recipe.image_size
        model.max_text_len = recipe.max_text_len
    elif synthetic:
        model.max_text_len = _SYNTHETIC_BUDGET[task][3]
    if task == "nlvr2":
        model.num_token_types = 3  # text, first image, second image
    if task == "vqa" and synthetic:
        model.vqa_num_answers = len(world.ANSWERS)
    config.model = model

    datasets = ("synthetic_shapes",) if synthetic else recipe.real_datasets
    if task == "retrieval" and not synthetic:
        datasets = (f"{arg.dataset}_retrieval",)
    config.data = ml_collections.ConfigDict(dict(
        datasets=datasets,
        data_dir="data" if synthetic else "",
        tokenizer_dir="",
        train_split=recipe.train_split,
        eval_splits=recipe.eval_splits,
        synthetic_seed=0,
        synthetic_train_images=0,  # images in the synthetic train split; 0: the default
        num_workers=0,
        max_skipped_fraction=0.01,
        log_example_ids=False,  # DIR/example_ids/process_<i>.jsonl (train/example_log.py)
        augment=not synthetic,
        flip=recipe.flip,
    ))
    config.losses = recipe.losses
    if task == "retrieval":
        config.retrieval = ml_collections.ConfigDict(dict(
            rerank_k=16 if synthetic else RERANK_K[arg.dataset],
            text_chunk=1024 if paper else 64,  # rows of the ITC similarity per device step
            pair_batch=256 if paper else 64,  # image-text pairs per ITM re-ranking step
        ))

    lr, batch, epochs = ((recipe.lr, recipe.batch_size, recipe.epochs) if paper
                         else _SYNTHETIC_BUDGET[task][:3])
    multipliers = ((recipe.lr_multiplier_cross, recipe.lr_multiplier_heads) if paper
                   else (1.0, 1.0))
    config.epochs = float(epochs)
    config.total_steps = 0  # > 0 overrides epochs
    config.batch_size = batch
    config.eval_batch_size = 256 if paper else 64
    config.grad_accum_steps = 1
    config.optimizer = ml_collections.ConfigDict(dict(
        lr=lr, b1=0.9, b2=0.98, eps=1e-8, weight_decay=recipe.weight_decay,
        warmup_fraction=recipe.warmup_fraction, grad_clip_norm=0.0,
        lr_multipliers=dict(cross_modal=float(multipliers[0]), heads=float(multipliers[1]))))
    config.on_nonfinite = "skip"

    config.seed = 0
    config.init_from = ""  # a pretraining workdir or converted checkpoint (DIR/params)
    config.log_every = 100 if paper else 20
    config.eval_every = 0  # steps; 0: only at the end; -1: never
    config.eval_steps = 0  # batches per evaluation; 0 = the whole split
    config.checkpoint_every = 2000 if paper else 500
    config.keep_checkpoints = 2
    # SIGTERM -> checkpoint -> exit within this many seconds (train/preemption.py): a little
    # below the scheduler's grace period (Kubernetes / GCE: 30 s).
    config.preemption_grace_s = 25.0
    config.mesh = mesh_config()  # data=-1 (all devices), fsdp=1, tensor=1, dcn_*=1
    config.logical_axis_rules = "data"  # preset (data|fsdp|tensor|fsdp_tensor) or pairs
    config.lock()
    return config
