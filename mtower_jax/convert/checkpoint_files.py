"""Reading PyTorch checkpoint files without ever executing code from them.

safetensors files are plain tensors. torch files (.bin / .pt / .pth / .ckpt) are read only
with `torch.load(weights_only=True)`, whose unpickler accepts tensors and plain containers
and refuses anything that would import or call code; such a file is rejected with a message
that says so (UnsafeCheckpointError), a truncated or garbage file with one that says that
(UnreadableCheckpointError); both are ValueErrors, which the converter CLI prints.
TorchScript archives (torch.jit.save; OpenAI's CLIP releases) are read by
torchscript_archive, which takes their tensors and never their code. Lightning
checkpoints keep their weights under 'state_dict' and their config under 'hyper_parameters'
(`load_lightning_checkpoint` returns both).
"""
from __future__ import annotations

import json
import os
import pickle
import re
from typing import Any

import numpy as np

from mtower_jax.convert import torchscript_archive


class UnsafeCheckpointError(ValueError):
    """The file needs pickled code to load; it is never executed."""


class UnreadableCheckpointError(ValueError):
    """The file is truncated, damaged or not in its format at all."""


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """{key: float32/int numpy array} from a .safetensors or torch file (a directory: its
    model.safetensors or pytorch_model.bin)."""
    path = _resolve(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        try:
            tensors = load_file(path)
        except Exception as e:  # SafetensorError: a bad header, a truncated file
            raise _unreadable(path, e) from None
        return {k: _as_numpy(v) for k, v in tensors.items()}
    return load_lightning_checkpoint(path)[0]


def load_lightning_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state dict, hyper_parameters) of a torch file: a PyTorch Lightning checkpoint
    {'state_dict': ..., 'hyper_parameters': ...} or a bare state dict (hyper_parameters {})."""
    path = _resolve(path)
    if torchscript_archive.is_torchscript_archive(path):
        try:
            tensors = torchscript_archive.read_tensors(path)
        except torchscript_archive.ArchiveError as e:
            raise UnsafeCheckpointError(f"{path} is a TorchScript archive that cannot be read as "
                                        f"tensors alone: {e}") from None
        except Exception as e:  # a damaged zip or pickle
            raise _unreadable(path, e) from None
        return {k: _as_numpy(v) for k, v in tensors.items()}, {}
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path} is a torch file: install torch (CPU) to read it, or convert "
                          "it to safetensors") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler refused something
        refused = re.search(r"GLOBAL (\S+)", str(e))  # the import it would have needed
        if refused:
            raise UnsafeCheckpointError(
                f"{path} needs pickled code to load (it imports {refused.group(1)}), and "
                f"checkpoints are never allowed to run code. Re-save its tensors with "
                f"safetensors, or as a plain state dict of tensors.") from None
        raise _unreadable(path, e) from None
    except Exception as e:  # garbage and truncated files fail anywhere in torch's reader
        raise _unreadable(path, e) from None
    hparams = {}
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        hparams = obj.get("hyper_parameters") or {}  # PyTorch Lightning
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: _as_numpy(v) for k, v in obj.items() if hasattr(v, "shape")}, dict(hparams)


def _unreadable(path: str, e: Exception) -> UnreadableCheckpointError:
    """The error for a file that fails to parse; names the file and the parser's reason."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = next((l for l in lines if "Unsupported" in l), lines[0] if lines else "")
    return UnreadableCheckpointError(
        f"{path} is not a readable checkpoint: truncated, damaged or not in its format "
        f"({type(e).__name__}: {detail[:200]}). Re-download or re-save it.")


def load_hf_config(path: str) -> dict[str, Any] | None:
    """config.json beside a checkpoint file (or inside a checkpoint directory), if any."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config = os.path.join(directory, "config.json")
    if not os.path.exists(config):
        return None
    with open(config) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ValueError(f"{config} is not valid JSON: {e}") from None


def _resolve(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
    return path


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (bfloat16 has no numpy dtype: go via float32)
        import torch
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()
        return value.numpy()
    value = np.asarray(value)
    return value.astype(np.float32) if value.dtype == np.float16 else value
