"""The mapping between a PyTorch state dict and our parameter tree, in both directions.

A checkpoint format is a list of `Rule`s: torch key <-> our parameter path, with a layout
that converts the array. `to_params` checks the whole state dict against the model's expected
shapes first and reports every missing key, unexpected key and shape mismatch together, by
name, before anything is built; `to_state_dict` inverts the same rules, so export is exact.

Layouts (torch -> ours):
  linear(n)   nn.Linear weight [out, in] -> kernel [*in, *out] (n = number of our input dims;
              attention projections are [embed, heads, kv], output projections [heads, kv, embed])
  vector      any 1-D tensor -> our shape (a bias [D] becomes [heads, kv] where needed)
  same        the same shape (embeddings, position tables)
  scalar      a 0-d or 1-element tensor -> ()
  patch       Conv2d weight [D, C, P, P] -> kernel [P*P*C, D] (flattened as our patchify)
  squeeze     any shape -> ours by reshape (e.g. the official manager weights [1, N, 1, D])
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    to_ours: Callable[[Array, tuple[int, ...]], Array]  # (torch array, our shape) -> ours
    to_torch: Callable[[Array], Array]


def linear(n_in: int = 1) -> Layout:
    return Layout(f"linear({n_in})",
                  lambda w, shape: w.T.reshape(shape),
                  lambda x: x.reshape(math.prod(x.shape[:n_in]), -1).T)


VECTOR = Layout("vector", lambda w, shape: w.reshape(shape), lambda x: x.reshape(-1))
SAME = Layout("same", lambda w, shape: w.reshape(shape), lambda x: x)
SCALAR = Layout("scalar", lambda w, shape: w.reshape(shape), lambda x: x.reshape(()))


def _patch_to_ours(w: Array, shape: tuple[int, ...]) -> Array:
    d, c, p, _ = w.shape
    return w.transpose(2, 3, 1, 0).reshape(p * p * c, d)


def _patch_to_torch(x: Array, channels: int = 3) -> Array:
    p = math.isqrt(x.shape[0] // channels)
    return x.reshape(p, p, channels, x.shape[1]).transpose(3, 2, 0, 1)


PATCH = Layout("patch", _patch_to_ours, _patch_to_torch)


def rows(index: int, count: int, inner: Layout) -> Layout:
    """Chunk `index` of `count` equal row blocks of a fused tensor (CLIP's in_proj: q, k, v).
    Rules that share a torch key are concatenated back along rows on export."""
    return Layout(f"rows({index}/{count}) {inner.name}",
                  lambda w, shape: inner.to_ours(np.split(w, count, axis=0)[index], shape),
                  inner.to_torch)


def squeeze(torch_shape: tuple[int, ...]) -> Layout:
    return Layout("squeeze", lambda w, shape: w.reshape(shape), lambda x: x.reshape(torch_shape))


@dataclasses.dataclass(frozen=True)
class Rule:
    torch_key: str
    path: str  # our parameter path, '/'-separated (e.g. 'backbone/text_pooler/dense/kernel')
    layout: Layout


def linear_rules(torch_prefix: str, path: str, n_in: int = 1, bias: bool = True) -> list[Rule]:
    """weight/bias of an nn.Linear -> kernel/bias of our Dense at `path`."""
    rules = [Rule(f"{torch_prefix}.weight", f"{path}/kernel", linear(n_in))]
    if bias:
        rules.append(Rule(f"{torch_prefix}.bias", f"{path}/bias", VECTOR))
    return rules


def norm_rules(torch_prefix: str, path: str) -> list[Rule]:
    """weight/bias of an nn.LayerNorm -> scale/bias of our LayerNorm at `path`."""
    return [Rule(f"{torch_prefix}.weight", f"{path}/scale", VECTOR),
            Rule(f"{torch_prefix}.bias", f"{path}/bias", VECTOR)]


class ConversionError(ValueError):
    """A state dict that does not fit the model; the message lists every problem."""


def _report(what: str, problems: dict[str, list[str]], hint: str) -> None:
    lines = []
    for kind, items in problems.items():
        if items:
            lines.append(f"{kind} ({len(items)}):")
            lines.extend(f"    {item}" for item in items)
    if lines:
        raise ConversionError(f"{what} does not match the model:\n  " + "\n  ".join(lines)
                              + (f"\n{hint}" if hint else ""))


def to_params(state_dict: Mapping[str, Array], rules: Iterable[Rule],
              expected: Mapping[str, tuple[int, ...]], ignore: Iterable[str] = (),
              what: str = "the checkpoint", hint: str = "") -> dict:
    """Converts `state_dict` into a nested params dict with exactly the paths of `expected`
    ({path: shape}). Keys in `ignore` (exact names) may be present and are dropped."""
    rules = list(rules)
    missing, mismatched, uncovered = [], [], []
    flat = {}
    for rule in rules:
        if rule.torch_key not in state_dict:
            missing.append(rule.torch_key)
            continue
        if rule.path not in expected:
            uncovered.append(f"{rule.torch_key} -> {rule.path} (no such parameter in the model)")
            continue
        value = np.asarray(state_dict[rule.torch_key])
        shape = tuple(expected[rule.path])
        try:
            converted = rule.layout.to_ours(value, shape)
        except ValueError:
            converted = None
        if converted is None or converted.shape != shape:
            mismatched.append(f"{rule.torch_key} {tuple(value.shape)} -> {rule.path} expects "
                              f"{shape}")
            continue
        flat[rule.path] = np.asarray(converted, np.float32)
    mapped = {rule.torch_key for rule in rules} | set(ignore)
    unexpected = sorted(k for k in state_dict if k not in mapped)
    not_filled = sorted(set(expected) - {rule.path for rule in rules})
    _report(what, {"missing keys": missing, "unexpected keys": unexpected,
                   "shape mismatches": mismatched, "rules for absent parameters": uncovered,
                   "model parameters with no source": not_filled}, hint)
    return traverse_util.unflatten_dict(flat, sep="/")


def to_state_dict(params: Mapping, rules: Iterable[Rule]) -> dict[str, Array]:
    """Our nested params -> {torch key: array}, by the inverse of each rule's layout."""
    flat = traverse_util.flatten_dict(params, sep="/")
    parts: dict[str, list[Array]] = {}
    missing = []
    for rule in rules:
        if rule.path not in flat:
            missing.append(rule.path)
            continue
        parts.setdefault(rule.torch_key, []).append(rule.layout.to_torch(np.asarray(flat[rule.path])))
    _report("the parameters", {"missing parameters": missing}, "")
    # np.require, not np.ascontiguousarray: that returns at least 1-d, and a 0-d tensor (a
    # SCALAR layout: HF's link-tower scaled_factor, beta) must stay 0-d for HF to load it.
    return {key: np.require(np.concatenate(p, axis=0) if len(p) > 1 else p[0], requirements="C")
            for key, p in parts.items()}
