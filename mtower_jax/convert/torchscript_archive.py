"""The tensors of a TorchScript archive (`torch.jit.save`), read without running its code.

OpenAI's CLIP releases (ViT-B-16.pt, ...) are such archives: a zip holding the scripted
modules' TorchScript source (code/), their pickled state (data.pkl) and raw tensor storages
(data/0, data/1, ...). `torch.load(weights_only=True)` refuses them and `torch.jit.load`
compiles and runs the archive's code, so this reads the state with an unpickler that knows
only tensors, plain containers and an inert stand-in for every scripted class
(`__torch__.*`); anything else in data.pkl is refused. Tensors are rebuilt in NumPy straight
from the storages, their views bounds-checked, so torch is not needed.

    state_dict = read_tensors(path)    {'visual.conv1.weight': array, ...}: the keys
                                       module.state_dict() would give (parameters and buffers)
"""
from __future__ import annotations

import collections
import pickle
import zipfile

import numpy as np

# torch.<Name>Storage -> the numpy dtype of its elements (bfloat16: read as uint16, widened).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class ArchiveError(ValueError):
    """data.pkl holds something other than tensors, containers and scripted modules, or a
    tensor view outside its storage."""


def is_torchscript_archive(path: str) -> bool:
    """True for a zip written by torch.jit.save (it holds code/ and constants.pkl)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


class _Scripted:
    """Stands in for a scripted module or class: its pickled state becomes attributes."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: the view (offset, size, stride) of a storage, copied."""
    size, stride = tuple(size), tuple(stride)
    if any(s < 0 for s in size + stride) or offset < 0 or len(size) != len(stride):
        raise ArchiveError(f"a tensor with size {size}, stride {stride}, offset {offset}")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise ArchiveError(f"a tensor view reaches element {last} of a storage of "
                               f"{storage.size}")
    view = np.lib.stride_tricks.as_strided(storage[offset:], size,
                                           tuple(s * storage.itemsize for s in stride),
                                           writeable=False)
    return np.array(view)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self.archive, self.prefix, self.byteorder = archive, prefix, byteorder

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name.startswith("build_"):  # build_intlist, ...
            return list
        if module.startswith("__torch__"):
            return type(name, (_Scripted,), {})
        raise ArchiveError(f"data.pkl needs {module}.{name}, which a checkpoint is never "
                           f"allowed to import")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise ArchiveError(f"an unknown persistent record {pid!r}")
        dtype = np.dtype(storage_type.dtype).newbyteorder("<" if self.byteorder == "little"
                                                          else ">")
        raw = self.archive.read(f"{self.prefix}data/{key}")
        values = np.frombuffer(raw, dtype, count=numel).astype(dtype.newbyteorder("="))
        if storage_type.name == "BFloat16Storage":  # the top half of a float32
            values = (values.astype(np.uint32) << 16).view(np.float32)
        return values


def _state_dict(root: _Scripted) -> dict[str, np.ndarray]:
    """Every array reachable through attributes, keyed by its dotted attribute path."""
    out, seen, stack = {}, set(), [("", root)]
    while stack:
        prefix, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for name, value in vars(obj).items():
            if isinstance(value, np.ndarray):
                out[prefix + name] = value
            elif isinstance(value, _Scripted):
                stack.append((f"{prefix}{name}.", value))
    return out


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """{dotted key: array} of the TorchScript archive at `path` (float16 / bfloat16 storages
    come back as float16 / float32)."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ArchiveError(f"{len(pickles)} data.pkl records at the archive's top level")
        prefix = pickles[0][:-len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = archive.read(f"{prefix}byteorder").decode().strip()
        with archive.open(pickles[0]) as f:
            root = _Unpickler(f, archive, prefix, byteorder).load()
    if not isinstance(root, _Scripted):
        raise ArchiveError(f"data.pkl holds a {type(root).__name__}, not a scripted module")
    return _state_dict(root)
