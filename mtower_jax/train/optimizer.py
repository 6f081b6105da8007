"""AdamW with the VLP recipe's parameter groups (DESIGN.md section 4).

    lr(t)      linear warmup 0 -> lr over warmup_fraction * total_steps, then linear -> 0
    groups     uni_modal    backbone/text_encoder/*, backbone/vision_encoder/*   lr x 1
               cross_modal  every other backbone parameter (transforms, token types,
                            cross-modal layers, managers / bridges, poolers)      lr x m_cross
               heads        *_head/*                                            lr x m_heads
    decay      weight_decay on every parameter but biases and LayerNorm scales
    clip       optional global-norm clipping of the whole gradient (0 = off)

The chain `clip -> scale_by_adam -> add_decayed_weights -> -lr(t) -> x group multiplier` is
PyTorch's AdamW with per-group learning rates (decay is scaled by the group's lr too).
"""
import jax
import ml_collections
import optax
from flax import traverse_util

GROUPS = ("uni_modal", "cross_modal", "heads")
_UNI_MODAL_SCOPES = ("text_encoder", "vision_encoder")


def param_group(path: tuple[str, ...]) -> str:
    """The lr group of a parameter, from its path in the params tree."""
    if path[0].endswith("_head"):
        return "heads"
    if path[0] == "backbone":
        return "uni_modal" if path[1] in _UNI_MODAL_SCOPES else "cross_modal"
    raise ValueError(f"parameter {'/'.join(path)} is in no optimizer group {GROUPS}")


def _tree_of(params, fn):
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: fn(path) for path in flat})


def group_labels(params) -> dict:
    return _tree_of(params, param_group)


def decay_mask(params) -> dict:
    """True where weight decay applies: not biases, not LayerNorm scales."""
    return _tree_of(params, lambda path: path[-1] not in ("bias", "scale"))


def learning_rate_schedule(lr: float, total_steps: int, warmup_fraction: float
                           ) -> optax.Schedule:
    warmup = int(round(warmup_fraction * total_steps))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)),
         optax.linear_schedule(lr, 0.0, max(total_steps - warmup, 1))], [warmup])


def multiplier(opt: ml_collections.ConfigDict, group: str) -> float:
    return 1.0 if group == "uni_modal" else float(opt.lr_multipliers[group])


def _scale_by_tree(factors) -> optax.GradientTransformation:
    """Multiplies each update leaf by the matching float in `factors` (same tree)."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, f: u * f, updates, factors), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int, params
                   ) -> optax.GradientTransformation:
    """`opt` is config.optimizer: lr, b1, b2, eps, weight_decay, warmup_fraction,
    grad_clip_norm, lr_multipliers{cross_modal, heads}. `params` may be abstract."""
    schedule = learning_rate_schedule(opt.lr, total_steps, opt.warmup_fraction)
    factors = _tree_of(params, lambda path: multiplier(opt, param_group(path)))
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm > 0
        else optax.identity(),
        optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps),
        optax.add_decayed_weights(opt.weight_decay, decay_mask(params)),
        optax.scale_by_learning_rate(schedule),
        _scale_by_tree(factors))
