"""The dataset builders by name, imported only when asked for (each pulls in tfds).

    builder = get_builder("coco_captions", raw_dir="/data/raw/coco", data_dir="/data/tfds")
    builder.build()

A builder's tfds name (its folder under data_dir) is its name here. Build from the shell
with `python -m mtower_jax.data.build NAME --raw_dir=... --data_dir=...`.
"""
import importlib

from mtower_jax.data.bad_records import DataError

_PACKAGE = "mtower_jax.data.builders"
BUILDERS = {
    "coco_captions": f"{_PACKAGE}.coco_captions:CocoCaptions",
    "visual_genome": f"{_PACKAGE}.visual_genome:VisualGenomeCaptions",
    "sbu": f"{_PACKAGE}.sbu:SbuCaptions",
    "cc3m": f"{_PACKAGE}.cc3m:ConceptualCaptions",
    "vqav2": f"{_PACKAGE}.vqav2:Vqav2",
    "nlvr2": f"{_PACKAGE}.nlvr2:Nlvr2",
    "snli_ve": f"{_PACKAGE}.snli_ve:SnliVe",
    "f30k_retrieval": f"{_PACKAGE}.retrieval:Flickr30kRetrieval",
    "coco_retrieval": f"{_PACKAGE}.retrieval:CocoRetrieval",
    "synthetic_shapes": f"{_PACKAGE}.synthetic_shapes:SyntheticShapes",
    "arrow_captions": f"{_PACKAGE}.arrow_import:ArrowCaptions",  # ViLT's .arrow caption files
}


def builder_class(name: str) -> type:
    """The builder class registered as `name`; a DataError listing the known names if none."""
    if name not in BUILDERS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(BUILDERS))}")
    module, attribute = BUILDERS[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def get_builder(name: str, **kwargs):
    """An instance of the builder registered as `name` (kwargs: raw_dir, data_dir, ...)."""
    return builder_class(name)(**kwargs)
