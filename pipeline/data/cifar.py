"""CIFAR-10 and CIFAR-100 as they are published: python batches and the binary version, local or s3://.

Folders (the dataset root may be the folder itself or the folder holding it):
- CIFAR-10 python `cifar-10-batches-py/`: `data_batch_1` ... `data_batch_5` (train), `test_batch` (test);
  binary `cifar-10-batches-bin/`: the same names with `.bin`.
- CIFAR-100 python `cifar-100-python/`: `train`, `test`; binary `cifar-100-binary/`: `train.bin`, `test.bin`.

A python batch is a pickle of {'data': uint8 [N, 3072], 'labels' (CIFAR-100: 'fine_labels'): N ints, ...}.
It is read by a restricted unpickler that constructs nothing but builtin containers and scalars and numpy
arrays: any other global (a function, a class) is refused before anything is called, so a crafted file
cannot run code. A binary record is the label byte (CIFAR-100: coarse, then fine) and 3072 pixel bytes.
Pixels are channel-major (1024 red, 1024 green, 1024 blue, rows top down). A file cut short (a pickle
that ends early, a binary file that is not whole records) is an error naming the file.

Images are numbered in file order across a split's batches; their ids are `<layout>/<split>/<index>`,
e.g. `cifar10/test/0` (CIFAR-100: fine labels).
"""

from __future__ import annotations

import builtins
import codecs
import io
import pickle
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs

from pipeline.storage import Location

LAYOUTS = ("cifar10", "cifar100")
SPLITS = ("train", "test")
SIDE = 32
PIXELS = 3 * SIDE * SIDE
PPM_HEADER = f"P6 {SIDE} {SIDE} 255\n".encode()

__all__ = ["LAYOUTS", "SPLITS", "CifarError", "CifarFiles", "as_ppm", "find_batches", "read_binary_batch", "read_cifar",
           "read_python_batch", "restricted_loads"]


class CifarError(ValueError):
    """A CIFAR file that cannot be read; the message names it."""


@dataclass(frozen=True)
class CifarFiles:
    """One published form of one dataset: its folder name, the batch files of each split, the label key of
    its python batches and the label bytes of its binary records (the label used is the last)."""

    folder: str
    batches: dict[str, tuple[str, ...]]
    label_key: str = "labels"
    label_bytes: int = 1
    classes: int = 10

    @property
    def binary(self) -> bool:
        return self.folder.endswith(("-bin", "-binary"))


FORMS = {
    "cifar10": (CifarFiles("cifar-10-batches-py", {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                                                   "test": ("test_batch",)}),
                CifarFiles("cifar-10-batches-bin", {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                                                    "test": ("test_batch.bin",)})),
    "cifar100": (CifarFiles("cifar-100-python", {"train": ("train",), "test": ("test",)}, "fine_labels", 2, 100),
                 CifarFiles("cifar-100-binary", {"train": ("train.bin",), "test": ("test.bin",)}, "fine_labels", 2,
                            100)),
}


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The numpy callables that rebuild arrays, dtypes and scalars from their pickled state, under the module
    names numpy 1 (`numpy.core`) and numpy 2 (`numpy._core`) pickle them with."""
    rebuilders = [np.ndarray.__reduce__(np.zeros(1))[0],  # _reconstruct (protocols up to 4)
                  np.zeros(1).__reduce_ex__(5)[0],  # _frombuffer (protocol 5)
                  np.float64(0).__reduce__()[0]]  # scalar
    found: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for function in rebuilders:
        module = function.__module__.replace("numpy._core", "numpy.core")
        found[(module, function.__name__)] = found[(module.replace("numpy.core", "numpy._core"), function.__name__)] = (
            function)
    return found


BUILTIN_TYPES = ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "complex",
                 "bool")
ALLOWED = {**_numpy_globals(), ("_codecs", "encode"): codecs.encode,  # how protocol 2 carries Python 3 bytes
           **{(module, name): getattr(builtins, name) for module in ("builtins", "__builtin__")
              for name in BUILTIN_TYPES}}


class _BatchUnpickler(pickle.Unpickler):
    """Resolves only the globals in ALLOWED; any other is refused before it is called."""

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR batch holds only builtin "
                                     f"containers, strings, numbers and numpy arrays")


def restricted_loads(data: bytes, source: str):
    """The object pickled in `data` (Python 2 strings read as latin-1, as numpy's own arrays need), built by
    the restricted unpickler; CifarError naming `source` for a refused global or a file cut short."""
    try:
        return _BatchUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as error:
        raise CifarError(f"{source}: {error}") from error
    except (EOFError, ValueError, TypeError, IndexError, AttributeError, KeyError, MemoryError) as error:
        raise CifarError(f"{source} is truncated or not a CIFAR python batch ({type(error).__name__}: "
                         f"{error or 'the pickle ends early'})") from error


def _key(mapping: dict, name: str):
    for key in (name, name.encode()):
        if key in mapping:
            return mapping[key]
    return None


def _checked(pixels: np.ndarray, labels: np.ndarray, source: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    if len(labels) != len(pixels):
        raise CifarError(f"{source}: {len(pixels)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise CifarError(f"{source}: labels must lie in 0..{classes - 1}, found {labels.min()}..{labels.max()}")
    return pixels, labels


def read_python_batch(data: bytes, source: str, form: CifarFiles) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 [N, 3072], labels int64 [N]) of one python batch."""
    batch = restricted_loads(data, source)
    if not isinstance(batch, dict):
        raise CifarError(f"{source}: expected a dict of 'data' and '{form.label_key}', found {type(batch).__name__}")
    pixels, labels = _key(batch, "data"), _key(batch, form.label_key)
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != PIXELS:
        shape = getattr(pixels, "shape", None)
        raise CifarError(f"{source}: 'data' must be a uint8 array [N, {PIXELS}], found {type(pixels).__name__} "
                         f"{shape}")
    if labels is None:
        raise CifarError(f"{source}: no '{form.label_key}' entry")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as error:
        raise CifarError(f"{source}: '{form.label_key}' must be a list of integers ({error})") from error
    return _checked(pixels, labels, source, form.classes)


def read_binary_batch(data: bytes, source: str, form: CifarFiles) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 [N, 3072], labels int64 [N]) of one binary batch."""
    record = form.label_bytes + PIXELS
    if len(data) % record:
        raise CifarError(f"{source} is truncated: {len(data)} bytes is not a whole number of {record}-byte records "
                         f"({len(data) // record} whole, {len(data) % record} bytes left over)")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    return _checked(records[:, form.label_bytes:], records[:, form.label_bytes - 1].astype(np.int64), source,
                    form.classes)


def _is_file(location: Location, path: str) -> bool:
    return location.fs.get_file_info(path).type == pafs.FileType.File


def find_batches(root: Location, layout: str, split: str) -> tuple[CifarFiles, list[str]]:
    """The form of the dataset under `root` and the paths of the split's batches, in order: the root itself
    holding the batches, or its standard folder (python version first); CifarError naming what is missing."""
    if split not in SPLITS:
        raise CifarError(f"dataset.split: {layout} has the splits {list(SPLITS)}, got {split!r}")
    for form in FORMS[layout]:
        for folder in (root.path, f"{root.path.rstrip('/')}/{form.folder}"):
            if _is_file(root, f"{folder}/{form.batches[split][0]}"):
                paths = [f"{folder}/{name}" for name in form.batches[split]]
                missing = [path for path in paths if not _is_file(root, path)]
                if missing:
                    raise CifarError(f"{root.uri}: the {split} split of {layout} lacks {missing}")
                return form, paths
    expected = " or ".join(f"{form.folder}/{form.batches[split][0]}" for form in FORMS[layout])
    raise CifarError(f"{root.uri} holds no {layout} {split} split: expected {expected} (in the root or below it)")


def read_cifar(root: Location, layout: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(pixels uint8 [N, 3, 32, 32], labels int64 [N], ids) of a split, in file order."""
    form, paths = find_batches(root, layout, split)
    reader = read_binary_batch if form.binary else read_python_batch
    pixels, labels = [], []
    for path in paths:
        source = f"s3://{path}" if root.is_s3 else path
        try:
            with root.fs.open_input_stream(path) as stream:
                data = stream.read()
        except OSError as error:
            raise CifarError(f"cannot read {source}: {error}") from error
        batch_pixels, batch_labels = reader(data, source, form)
        pixels.append(batch_pixels)
        labels.append(batch_labels)
    images = np.concatenate(pixels).reshape(-1, 3, SIDE, SIDE)
    return images, np.concatenate(labels), [f"{layout}/{split}/{index}" for index in range(len(images))]


def as_ppm(image: np.ndarray) -> bytes:
    """One uint8 [3, 32, 32] image as binary PPM bytes: uncompressed and lossless, decoded like any file."""
    return PPM_HEADER + np.ascontiguousarray(image.transpose(1, 2, 0)).tobytes()
