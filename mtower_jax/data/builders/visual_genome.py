"""Visual Genome region descriptions as captions, for pretraining (captions schema).

Raw layout under raw_dir (https://homes.cs.washington.edu/~ranjay/visualgenome/api.html,
version 1.2: "region descriptions" and the two image zips):

    region_descriptions.json   [{"id": 1, "regions": [{"phrase": "the clock is green",
                               "image_id": 1, ...}, ...]}, ...]
    VG_100K/1.jpg ...          the images, split over two folders by the zips;
    VG_100K_2/2417985.jpg ...  each image is looked up in VG_100K first, then VG_100K_2

Split: `train` (108k images, 5.4M phrases). One record per image with all its region
phrases in file order; key and `image_id` are the VG image id.

Optional: `exclude_ids_file=PATH` (a constructor argument) leaves out the images listed in
it, one VG image id per line, e.g. the VG images that are also in the COCO Karpathy val/test
splits (VG's image_data.json gives each image's `coco_id`) when the pretrained model will be
evaluated on COCO retrieval.
"""
import os
from mtower_jax.data.bad_records import DataError
from mtower_jax.data.builders.base import RawFilesBuilder, read_json
from mtower_jax.data.builders.raw_rows import entry_records, raw_path, require

LAYOUT = __doc__
ANNOTATION = "region_descriptions.json"
IMAGE_DIRS = ("VG_100K", "VG_100K_2")


def image_path(raw_dir: str, image_id: str) -> str:
    """The image's path in the first folder that has it (the first folder if none does,
    so that a missing image is reported with a path)."""
    paths = [raw_path(raw_dir, folder, f"{image_id}.jpg") for folder in IMAGE_DIRS]
    return next((path for path in paths if os.path.exists(path)), paths[0])


def read_ids(path: str, what: str) -> set[str]:
    """The image ids listed in `path`, one per line."""
    try:
        with open(require(path, what), encoding="utf-8") as f:
            return {line.strip() for line in f if line.strip()}
    except UnicodeDecodeError as e:  # a damaged list would let excluded images through
        raise DataError(f"{what}: {path} is not UTF-8 text ({e}); it should hold one VG "
                        f"image id per line") from None


class VisualGenomeCaptions(RawFilesBuilder):
    """Visual Genome region descriptions, one record per image, for pretraining."""
    name = "visual_genome"
    VERSION = "1.0.0"
    SCHEMA = "captions"
    RAW_FILES = LAYOUT

    def __init__(self, *, exclude_ids_file: str | None = None, **kwargs):
        self.exclude_ids_file = exclude_ids_file
        super().__init__(**kwargs)

    def _splits(self, raw_dir: str, bad) -> dict:
        path = os.path.join(raw_dir, ANNOTATION)
        images = read_json(path, self.name)
        if not isinstance(images, list):
            raise DataError(f"{self.name}: {path} is not a list of images")
        excluded = read_ids(self.exclude_ids_file, self.name) if self.exclude_ids_file else set()

        def parse(entry: dict) -> tuple[str, tuple[str, ...], list]:
            key = str(entry["id"])
            return key, (image_path(raw_dir, key),), entry["regions"]

        entries = ((i, entry) for i, entry in enumerate(images)
                   if not (isinstance(entry, dict) and str(entry.get("id")) in excluded))
        return {"train": entry_records(entries, path, bad("train"), parse, "phrase")}
