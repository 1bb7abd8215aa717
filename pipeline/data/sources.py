"""Where images come from: a listing of (image_id, label, path or bytes) in dataset order.

Layouts:
- `demo`: the embedded digits (`pipeline.data.demo`), as PNG bytes.
- `imagenet_folder`: `root/<wnid>/<file>`; labels are the wnid's position in the sorted synset list
  (torchvision's ImageNet class index).
- `imagenet_val`: the flat validation folder plus a ground-truth file, either Kaggle's
  `LOC_val_solution.csv` (wnids) or the devkit's `ILSVRC2012_validation_ground_truth.txt`
  (ILSVRC2012_IDs, mapped to wnids through the devkit's `meta.mat`).
- `parquet`: shards with columns `image` (encoded bytes), `label` and `image_id`.
- `cifar10`, `cifar100`: the published python batches or binary version (`pipeline.data.cifar`); ids
  `cifar10/<split>/<index>`; each image travels as PPM bytes (uncompressed, lossless).
- `hf_parquet`: Parquet as dataset hubs publish it, an image struct column {bytes, path} and a label column
  (`pipeline.data.hub`); ids are the image paths, or `<split>/<index>`.

Image ids are the file names (ImageNet's are unique across the dataset, so an image keeps its id, and
therefore its noise, in every layout), or the paths relative to the root with `id: relative_path`.
The synset list comes from `synsets` (a text file, one wnid first on each line, as in
`LOC_synset_mapping.txt`), or the devkit's `meta.mat`, or else the sorted folder names. Dataset order
(sorted paths, batch order, or shard order) is what the papers' subsample (`skip`, `max`: every skip-th
image below index max, e.g. `skip: 20` for every 20th CIFAR-10 test image) counts in.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Callable
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from PIL import Image
from pydantic import Field, model_validator

from pipeline.data import cifar
from pipeline.data.demo import load_demo
from pipeline.data.hub import HubError, open_shards
from pipeline.data.preprocess import MAX_PIXELS, Transform
from pipeline.sections import Count, Section
from pipeline.storage import DEFAULT_STORAGE, Location, Storage, StorageError

log = logging.getLogger(__name__)

LAYOUTS = ("demo", "imagenet_folder", "imagenet_val", "parquet", *cifar.LAYOUTS, "hf_parquet")
CARRIES_BYTES = ("demo", *cifar.LAYOUTS, "hf_parquet")  # layouts whose listings hold the encoded images
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
LISTING_SCHEMA = pa.schema([("index", pa.int64()), ("image_id", pa.string()), ("label", pa.int64()),
                            ("path", pa.string()), ("image", pa.binary())])

__all__ = ["LAYOUTS", "LISTING_SCHEMA", "DatasetError", "DatasetSpec", "list_images", "parquet_files", "read_encoded",
           "subsample"]
DEMO_SIZE = 32  # the demo digits' side, and CIFAR's


class DatasetError(ValueError):
    """A dataset that cannot be read as configured; the message names the file or key."""


class DatasetSpec(Section):
    """A dataset entry of a config: where the images are (`layout`, `root` and the layout's files), which of
    them (`skip`, `max`, the papers' subsample; `split` of the demo digits, of CIFAR and of hub shards) and how
    they become model inputs (`transform`); `image_column` and `label_column` name the columns of
    `hf_parquet` shards. A spec that exists is valid: the rules below run when it is made."""

    layout: Annotated[str, Field(json_schema_extra={"enum": list(LAYOUTS)})] = "demo"
    root: str | None = None
    split: Annotated[str, Field(min_length=1)] = "test"
    skip: Count = Field(1, ge=1)
    max: Count | None = Field(None, ge=1)
    size: Count | None = None  # the square centre crop; the demo digits' 32 by default, required otherwise
    resize: Count | None = None
    channels: Count = Field(3, ge=1)
    mode: str | None = "RGB"
    max_pixels: Count = Field(MAX_PIXELS, ge=1)  # larger images become error rows before they are decoded
    ground_truth: str | None = None
    meta: str | None = None
    synsets: str | None = None
    id: Literal["name", "relative_path"] = "name"
    image_column: Annotated[str, Field(min_length=1)] | None = None
    label_column: Annotated[str, Field(min_length=1)] | None = "label"

    @classmethod
    def keys(cls) -> set[str]:
        return set(cls.model_fields)

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        """The rules between keys; every message names its key."""
        transform, layout = self.transform, self.layout
        if layout not in LAYOUTS:
            raise ValueError(f"{{where}}.layout: unknown layout {layout!r}; known: {list(LAYOUTS)}")
        if layout != "demo" and not self.root:
            raise ValueError(f"{{where}}.root: the {layout} layout needs a root path or s3:// URI")
        if layout in cifar.LAYOUTS and self.split not in cifar.SPLITS:
            raise ValueError(f"{{where}}.split: {layout} has the splits {list(cifar.SPLITS)}, got {self.split!r}")
        if transform.size is None or transform.size < 1:
            raise ValueError(f"{{where}}.size (the centre-crop side) must be an integer >= 1, got {transform.size!r}")
        if transform.resize is not None and transform.resize < transform.size:
            raise ValueError(f"{{where}}.resize must be an integer >= {{where}}.size, got {transform.resize!r}")
        if self.mode is not None:
            if self.mode not in Image.MODES:
                raise ValueError(f"{{where}}.mode: unknown image mode {self.mode!r}; use one of PIL's, e.g. RGB or L "
                                 f"(or null)")
            bands = Image.getmodebands(self.mode)
            if bands != transform.channels:
                raise ValueError(f"{{where}}.mode {self.mode} has {bands} channel(s), but {{where}}.channels is "
                                 f"{transform.channels}")
        return self

    @property
    def transform(self) -> Transform:
        """The one place a dataset's transform is derived (certification and denoiser training alike)."""
        size = self.size if self.size is not None or self.layout not in ("demo", *cifar.LAYOUTS) else DEMO_SIZE
        return Transform(size=size, resize=self.resize, channels=self.channels, mode=self.mode,
                         max_pixels=self.max_pixels)


def subsample(count: int, skip: int = 1, max_index: int | None = None) -> list[int]:
    """Dataset indices certified by the papers' protocol: every `skip`-th index, stopping at index `max_index`."""
    if skip < 1:
        raise DatasetError(f"dataset.skip must be >= 1, got {skip!r}")
    stop = count if max_index is None else min(count, max_index)
    return list(range(0, stop, skip))


def _read_text(location: Location, path: str) -> str:
    try:
        with location.fs.open_input_stream(path) as stream:
            return stream.read().decode()
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error}") from error


def _file_location(uri: str, storage: Storage) -> tuple[Location, str]:
    location = storage.open(uri)
    return location, location.path


def _synsets_from_meta(uri: str, storage: Storage) -> tuple[list[str], dict[int, str]]:
    """(sorted wnids of the 1000 classes, ILSVRC2012_ID -> wnid) from the devkit's meta.mat."""
    from scipy.io import loadmat

    location, path = _file_location(uri, storage)
    try:
        with location.fs.open_input_stream(path) as stream:
            synsets = loadmat(io.BytesIO(stream.read()), squeeze_me=True)["synsets"]
    except (OSError, KeyError, ValueError) as error:
        raise DatasetError(f"cannot read the synset table of the devkit file {uri}: {error}") from error
    by_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in np.atleast_1d(synsets)
             if int(s["num_children"]) == 0}
    return sorted(by_id.values()), by_id


def _synsets_from_file(uri: str, storage: Storage) -> list[str]:
    location, path = _file_location(uri, storage)
    wnids = [line.split()[0] for line in _read_text(location, path).splitlines() if line.strip()]
    if not all(re.fullmatch(r"n\d{8}", wnid) for wnid in wnids):
        raise DatasetError(f"{uri}: expected one wnid (n01234567) first on every line")
    return sorted(wnids)


def _listing(ids: list[str], labels: list, paths: list | None = None, images: list | None = None) -> pa.Table:
    """A listing in dataset order; `index` is each image's position in the whole dataset."""
    empty = [None] * len(ids)
    return pa.table({"index": range(len(ids)), "image_id": ids, "label": labels, "path": paths or empty,
                     "image": images or empty}, schema=LISTING_SCHEMA)


def _class_index(spec: DatasetSpec, storage: Storage, fallback: list[str]) -> dict[str, int]:
    if spec.synsets:
        wnids = _synsets_from_file(spec.synsets, storage)
    elif spec.meta:
        wnids, _ = _synsets_from_meta(spec.meta, storage)
    else:
        wnids = sorted(set(fallback))
        if len(wnids) != 1000:
            log.warning("class index from the %d synsets present; give dataset.synsets or dataset.meta to use "
                        "the full ImageNet list", len(wnids))
    return {wnid: index for index, wnid in enumerate(wnids)}


def _list_files(location: Location) -> list[pafs.FileInfo]:
    """The image files below a dataset root, in path order. Local file names that are not valid UTF-8 are
    skipped with a warning naming their raw bytes (no id or path could name them)."""
    try:
        if isinstance(location.fs, pafs.LocalFileSystem):
            infos = _local_files(location.path)
        else:
            infos = location.fs.get_file_info(pafs.FileSelector(location.path, recursive=True))
    except (FileNotFoundError, OSError) as error:
        raise DatasetError(f"cannot list dataset root {location.uri}: {error}") from error
    images = sorted((i for i in infos if i.type == pafs.FileType.File and i.base_name.lower().endswith(IMAGE_SUFFIXES)),
                    key=lambda i: i.path)
    if not images:
        raise DatasetError(f"no images under {location.uri} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return images


def _local_files(root: str) -> list[pafs.FileInfo]:
    """Every file below `root`, each listed once. Directory links are followed, but a directory already
    walked (the same device and inode, e.g. a link back to a parent) is not entered again, so a link loop
    ends the walk instead of listing images under made-up paths (and labels) without end."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no such directory: {root}")
    files, undecodable, loops, seen = [], [], [], set()
    for directory, subdirectories, names in os.walk(os.fsencode(root), followlinks=True):
        status = os.stat(directory)
        seen.add((status.st_dev, status.st_ino))
        for name in list(subdirectories):
            status = os.stat(os.path.join(directory, name))
            if (status.st_dev, status.st_ino) in seen:
                subdirectories.remove(name)
                loops.append(os.path.join(directory, name))
            seen.add((status.st_dev, status.st_ino))
        for name in names:
            try:
                files.append(pafs.FileInfo(os.path.join(directory, name).decode("utf-8"), pafs.FileType.File))
            except UnicodeDecodeError:
                undecodable.append(os.path.join(directory, name))
    if undecodable:
        log.warning("skipped %d file(s) whose names are not valid UTF-8, e.g. %r", len(undecodable), undecodable[0])
    if loops:
        log.warning("did not follow %d directory link(s) to folders already listed, e.g. %s", len(loops),
                    os.fsdecode(loops[0]))
    return files


def _image_ids(spec: DatasetSpec, root: Location, files: list[pafs.FileInfo]) -> list[str]:
    if spec.id == "relative_path":
        return [info.path[len(root.path):].lstrip("/") for info in files]
    return [info.base_name for info in files]


def _imagenet_folder(spec: DatasetSpec, storage: Storage) -> pa.Table:
    root = storage.open(spec.root)
    files = _list_files(root)
    relative = [info.path[len(root.path):].lstrip("/") for info in files]
    folders = [name.split("/")[0] for name in relative if "/" in name]
    index = _class_index(spec, storage, folders)
    labels = []
    for name in relative:
        wnid = name.split("/")[0] if "/" in name else None
        if wnid not in index:
            raise DatasetError(f"{root.uri}/{name}: folder {wnid!r} is not a synset of the class list")
        labels.append(index[wnid])
    return _listing(_image_ids(spec, root, files), labels, paths=[info.path for info in files])


def _ground_truth(spec: DatasetSpec, storage: Storage) -> dict[str, int]:
    """Image stem ('ILSVRC2012_val_00000001') -> class index, from either ground-truth convention."""
    location, path = _file_location(spec.ground_truth, storage)
    text = _read_text(location, path)
    if path.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
        if not rows or "ImageId" not in rows[0] or "PredictionString" not in rows[0]:
            raise DatasetError(f"{spec.ground_truth}: expected the columns ImageId,PredictionString")
        wnid_of = {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}
        index = _class_index(spec, storage, list(wnid_of.values()))
        return {stem: index[wnid] for stem, wnid in wnid_of.items()}
    if not spec.meta:
        raise DatasetError("dataset.meta: the devkit ground truth numbers classes by ILSVRC2012_ID; give the "
                           "devkit's meta.mat to map them to wnids")
    wnids, by_id = _synsets_from_meta(spec.meta, storage)
    index = {wnid: position for position, wnid in enumerate(wnids)}
    ids = [int(line) for line in text.split()]
    return {f"ILSVRC2012_val_{number:08d}": index[by_id[ilsvrc_id]] for number, ilsvrc_id in enumerate(ids, 1)}


def _imagenet_val(spec: DatasetSpec, storage: Storage) -> pa.Table:
    if not spec.ground_truth:
        raise DatasetError("dataset.ground_truth: the flat validation layout needs LOC_val_solution.csv or "
                           "ILSVRC2012_validation_ground_truth.txt")
    root = storage.open(spec.root)
    labels_of = _ground_truth(spec, storage)
    files = _list_files(root)
    labels, paths = [], []
    for info in files:
        stem = info.base_name.rsplit(".", 1)[0]
        if stem not in labels_of:
            raise DatasetError(f"{root.uri}/{info.base_name} has no entry in {spec.ground_truth}")
        labels.append(labels_of[stem])
        paths.append(info.path)
    return _listing(_image_ids(spec, root, files), labels, paths=paths)


def parquet_files(spec: DatasetSpec, storage: Storage) -> tuple[Location, list[str]]:
    root = storage.open(spec.root)
    info = root.fs.get_file_info(root.path)
    files = [root.path] if info.type == pafs.FileType.File else root.list_files(".parquet")
    if not files:
        raise DatasetError(f"no Parquet files at {root.uri}")
    return root, files


def _parquet(spec: DatasetSpec, storage: Storage) -> pa.Table:
    root, files = parquet_files(spec, storage)
    try:
        ids = pads.dataset(files, filesystem=root.fs, format="parquet").to_table(columns=["image_id", "label"])
    except (OSError, pa.ArrowInvalid) as error:
        raise DatasetError(f"cannot read image_id and label from the Parquet shards at {root.uri}: {error}") from error
    return _listing(ids["image_id"].cast(pa.string()).to_pylist(), ids["label"].cast(pa.int64()).to_pylist())


def _cifar(spec: DatasetSpec, storage: Storage) -> tuple[pa.Table, Callable]:
    images, labels, ids = cifar.read_cifar(storage.open(spec.root), spec.layout, spec.split)
    return _listing(ids, labels.tolist()), lambda indices: [cifar.as_ppm(images[i]) for i in indices]


def _hub(spec: DatasetSpec, storage: Storage) -> tuple[pa.Table, Callable]:
    shards = open_shards(storage.open(spec.root), spec.split, spec.image_column, spec.label_column)
    labels, ids = shards.labels_and_ids(spec.split)
    return _listing(ids, labels), shards.read_images


def _demo(spec: DatasetSpec) -> pa.Table:
    images, labels, ids = load_demo(spec.split)
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return _listing(ids, labels.tolist(), images=encoded)


def list_images(spec: DatasetSpec, storage: Storage = DEFAULT_STORAGE) -> pa.Table:
    """The dataset's images in dataset order, after the `skip` / `max` subsample; columns of LISTING_SCHEMA
    (`index` counts in the whole dataset, before the subsample).

    Rows of `parquet` datasets carry neither path nor bytes here: the shards are read by the job itself.
    Rows of the CIFAR and `hf_parquet` layouts carry the bytes of the subsample's images only.
    """
    readers = {"demo": lambda: (_demo(spec), None), "imagenet_folder": lambda: (_imagenet_folder(spec, storage), None),
               "imagenet_val": lambda: (_imagenet_val(spec, storage), None),
               "parquet": lambda: (_parquet(spec, storage), None), "hf_parquet": lambda: _hub(spec, storage),
               **{layout: lambda: _cifar(spec, storage) for layout in cifar.LAYOUTS}}
    if spec.layout not in readers:
        raise DatasetError(f"dataset.layout: unknown layout {spec.layout!r}; known: {list(LAYOUTS)}")
    if spec.layout != "demo" and not spec.root:
        raise DatasetError(f"dataset.root: the {spec.layout} layout needs a root path or s3:// URI")
    try:
        listing, read_images = readers[spec.layout]()
        listing = listing.take(subsample(listing.num_rows, int(spec.skip), spec.max))
        if read_images is not None:
            images = pa.array(read_images(listing["index"].to_pylist()), pa.binary())
            listing = listing.set_column(listing.schema.get_field_index("image"), "image", images)
    except (StorageError, cifar.CifarError, HubError) as error:
        raise DatasetError(str(error)) from error
    duplicates = listing.num_rows - len(set(listing["image_id"].to_pylist()))
    if duplicates:
        raise DatasetError(f"dataset has {duplicates} repeated image_id(s); ids must be unique (for folder layouts "
                           f"with repeated file names, set dataset.id: relative_path)")
    return listing


def read_encoded(spec: DatasetSpec, listing: pa.Table, storage: Storage = DEFAULT_STORAGE) -> list[bytes]:
    """The encoded bytes of every image of a listing (from `list_images`), in its order."""
    ids = listing["image_id"].to_pylist()
    if spec.layout == "parquet":
        root, files = parquet_files(spec, storage)
        shards = pads.dataset(files, filesystem=root.fs, format="parquet").to_table(columns=["image_id", "image"])
        by_id = dict(zip(shards["image_id"].to_pylist(), shards["image"].to_pylist(), strict=True))
        return [by_id[image_id] for image_id in ids]
    if spec.layout in CARRIES_BYTES:
        return listing["image"].to_pylist()
    fs = storage.open(spec.root).fs
    encoded = []
    for path in listing["path"].to_pylist():
        with fs.open_input_stream(path) as stream:
            encoded.append(stream.read())
    return encoded
