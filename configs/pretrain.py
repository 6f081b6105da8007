"""Vision-language pretraining: MLM + ITM on image-caption pairs (DESIGN.md section 4).

    python -m mtower_jax.main --config=configs/pretrain.py:model=tiny,tower=manager,data=synthetic \
        --workdir=runs/pretrain --config.total_steps=500

Arguments (comma-separated, typed):
  model  tiny | small | base | large   (tiny runs on a laptop CPU; base is the paper's model)
  tower  manager | bridge | meter
  data   synthetic | real               (real: COCO + VG + SBU + CC3M builders under data_dir)
"""
import ml_collections

from mtower_jax.config_args import parse_arg
from mtower_jax.models import model_config
from mtower_jax.models.config import SIZES
from mtower_jax.models.towers import TOWERS
from mtower_jax.train.mesh import mesh_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, choices=dict(model=SIZES, tower=TOWERS, data=("synthetic", "real")),
                    model="tiny", tower="manager", data="synthetic")
    paper = arg.model in ("base", "large")
    config = ml_collections.ConfigDict()
    config.model = model_config(arg.model, arg.tower)

    synthetic = arg.data == "synthetic"
    config.data = ml_collections.ConfigDict(dict(
        # Builder names (mtower_jax/data/builders); their examples are concatenated.
        datasets=("synthetic_shapes",) if synthetic else (
            "coco_captions", "visual_genome", "sbu", "cc3m"),
        data_dir="data" if synthetic else "",  # real data: the tfds folder the builders wrote
        # '' = the synthetic world's BPE (data=synthetic); data=real needs roberta-base's files.
        tokenizer_dir="",
        train_split="train",
        eval_splits=("val",),
        synthetic_seed=0,
        num_workers=0,  # grain worker processes
        max_skipped_fraction=0.01,  # bad records tolerated before the run fails
        log_example_ids=False,  # DIR/example_ids/process_<i>.jsonl (train/example_log.py)
        # ITM's false images: 'batch' another encoded image of the global batch; 'shard' of
        # the example's device shard (no all-gather of the image stream: pods, SCALING.md);
        # 'dataset' drawn by the pipeline, the reference's way (one more image encoding).
        itm_negatives="batch",
    ))
    config.task = "pretrain"
    config.losses = ("mlm", "itm")
    config.mlm_probability = 0.15
    # Masked tokens per text, at most (data/masking.py): the MLM head decodes only these.
    # 0 = auto, ceil(2 x 0.15 x max_text_len); -1 = no cap, decode every position.
    config.mlm_max_predictions = 0

    # Recipe: 100k steps at batch 4096 for the paper's models; a few hundred for tiny.
    config.total_steps = 100_000 if paper else 300
    config.batch_size = 4096 if paper else 32  # global, across all processes
    config.grad_accum_steps = 1
    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-5 if paper else 1e-4, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01,
        warmup_fraction=0.1, grad_clip_norm=0.0,  # 0 = no clipping
        lr_multipliers=dict(cross_modal=5.0, heads=5.0)))
    config.on_nonfinite = "skip"

    config.seed = 0
    config.init_from = ""
    config.log_every = 100 if paper else 10
    config.eval_every = 5000 if paper else 100  # 0: only at the end; -1: never
    config.eval_steps = 50 if paper else 4  # batches per periodic evaluation (the last: all)
    config.eval_batch_size = 256 if paper else 32
    config.checkpoint_every = 5000 if paper else 100
    config.keep_checkpoints = 3
    # SIGTERM -> checkpoint -> exit within this many seconds (train/preemption.py): a little
    # below the scheduler's grace period (Kubernetes / GCE: 30 s).
    config.preemption_grace_s = 25.0
    # Mesh axis sizes (train/mesh.py) and the rules mapping logical axes onto them
    # (models/partitioning.py); docs/SCALING.md says which to pick.
    config.mesh = mesh_config()  # data=-1 (all devices), fsdp=1, tensor=1, dcn_*=1
    config.logical_axis_rules = "data"  # preset (data|fsdp|tensor|fsdp_tensor) or pairs
    config.lock()
    return config
