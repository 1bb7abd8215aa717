"""Decoding and preprocessing on CPU workers: encoded bytes to uint8 [C, H, W] arrays.

`Transform(resize=256, size=224)` is ImageNet's Resize(256) + CenterCrop(224) (torchvision, on the PIL
image, as the papers did). Pixels stay 8-bit, so every value lies on the 1/255 grid after scaling:
16-bit images are scaled to 8 bits (v / 257, rounded), never clipped; other deep formats (32-bit integer or
float pixels) are refused. An image above `max_pixels` is refused before it is decoded.
A bad image never raises: it comes back as an error message with a zero array in its place, whatever
exception PIL's decoders raise on damaged bytes. Only the formats image datasets hold are opened
(`FORMATS`), so bytes that merely look like an exotic format are not handed to its decoder.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, UnidentifiedImageError

from pipeline.storage import StorageOutage, retrying

NO_LABEL = -1  # the label of an image its dataset does not label, in decoded batches
MAX_PIXELS = 50_000_000  # the default pixel cap: about 7 times ImageNet's largest image
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "PPM", "GIF", "TIFF")  # what Image.open may try; CIFAR travels as PPM

__all__ = ["NO_LABEL", "ImageError", "Transform", "decode", "decode_batch"]


class ImageError(ValueError):
    """An image that cannot be certified; the message says why."""


@dataclass(frozen=True)
class Transform:
    """`resize`: shorter side first (optional); `size`: the square centre crop every image ends at;
    `channels`: what the model expects; `mode`: convert with PIL first (e.g. "RGB", as torchvision's
    ImageFolder does), or None to reject images whose channel count differs."""

    size: int
    resize: int | None = None
    channels: int = 3
    mode: str | None = "RGB"
    max_pixels: int = MAX_PIXELS

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)


def decode(data: bytes, transform: Transform) -> np.ndarray:
    """uint8 array of `transform.shape`, or ImageError (also for any other exception a decoder raises)."""
    try:
        with warnings.catch_warnings():  # damaged files make PIL warn as well as fail; the error row says why
            warnings.simplefilter("ignore")
            return _decode(data, transform)
    except ImageError:
        raise
    except Exception as error:  # PIL's plugins raise NotImplementedError, AttributeError, ... on damaged files
        raise ImageError(f"cannot decode image: {type(error).__name__}: {error}") from error


def _decode(data: bytes, transform: Transform) -> np.ndarray:
    from torchvision.transforms import v2  # here: a process that never decodes never pays for the import

    image = _open(data, transform.max_pixels)
    if transform.mode:
        image = image.convert(transform.mode)
    channels = len(image.getbands())
    if channels != transform.channels:
        raise ImageError(f"image has {channels} channel(s) (mode {image.mode}), the model expects "
                         f"{transform.channels}")
    if transform.resize:
        image = v2.functional.resize(image, transform.resize)
    if min(image.size) < transform.size:
        raise ImageError(f"image is {image.size[0]}x{image.size[1]} after resizing, smaller than the "
                         f"{transform.size}x{transform.size} crop")
    image = v2.functional.center_crop(image, transform.size)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels.reshape(*pixels.shape[:2], -1).transpose(2, 0, 1).copy()


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The decoded image, 16-bit pixels scaled to 8 bits; ImageError for what cannot be certified."""
    if not data:
        raise ImageError("the file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as error:
        raise ImageError(f"image is too large to decode safely: {error}") from error
    except UnidentifiedImageError as error:
        raise ImageError("cannot identify an image in the file (not an image, or a format PIL cannot read)") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"cannot decode image: {error}") from error
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height:,} pixels, above the cap of {max_pixels:,} "
                         f"(dataset.max_pixels)")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"cannot decode image: {error}") from error
    if image.mode in SIXTEEN_BIT:
        wide = np.asarray(image, dtype=np.uint16).astype(np.float64)
        return Image.fromarray(np.rint(wide / 257).astype(np.uint8), mode="L")
    if image.mode in ("I", "F"):
        raise ImageError(f"image has {'32-bit integer' if image.mode == 'I' else 'floating-point'} pixels (mode "
                         f"{image.mode}); give 8- or 16-bit images")
    return image


def decode_batch(batch: dict[str, np.ndarray], transform: Transform, fs: pafs.FileSystem | None = None,
                 keep: dict[str, int] | None = None, retry_seconds: float = 0.0) -> dict[str, np.ndarray]:
    """Decodes a batch of listing rows (encoded `image` bytes, or a `path` read from `fs`) into uint8 pixels.

    An image that cannot be read or decoded keeps its row, with zeros for pixels and the reason in `error`
    ("" for good images); a store that stays unreachable for `retry_seconds` is no image's fault and raises
    StorageOutage instead. Labels a dataset lacks (null, NaN or negative) become NO_LABEL. With `keep`
    (image_id -> dataset index, for Parquet shards), rows whose image_id is not in it are dropped.
    """
    ids = [str(i) for i in batch["image_id"]]
    rows = [i for i, image_id in enumerate(ids) if keep is None or image_id in keep]
    indices = [keep[ids[row]] if keep is not None else int(batch["index"][row]) for row in rows]
    pixels = np.zeros((len(rows), *transform.shape), dtype=np.uint8)
    errors = []
    for out, row in enumerate(rows):
        data = batch["image"][row] if "image" in batch else None
        try:
            if data is None and (fs is None or "path" not in batch or batch["path"][row] is None):
                raise ImageError("the row holds no image bytes")
            if data is None:
                data = _read(fs, str(batch["path"][row]), retry_seconds)
            pixels[out] = decode(bytes(data), transform)
            errors.append("")
        except StorageOutage:
            raise
        except (ImageError, OSError) as error:
            errors.append(f"{ids[row]}: {error}")
    return {"index": np.array(indices, dtype=np.int64), "image_id": np.array([ids[row] for row in rows], dtype=object),
            "label": np.array([_label(batch["label"][row]) for row in rows], dtype=np.int64),
            "pixels": pixels, "error": np.array(errors, dtype=object)}


def _read(fs: pafs.FileSystem, path: str, retry_seconds: float) -> bytes:
    def read() -> bytes:
        with fs.open_input_stream(path) as stream:
            return stream.read()

    return retrying(read, f"reading {path}", retry_seconds) if retry_seconds else read()


def _label(value) -> int:
    if value is None or (isinstance(value, float) and math.isnan(value)) or int(value) < 0:
        return NO_LABEL
    return int(value)
