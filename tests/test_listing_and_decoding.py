"""Datasets that list and decode without surprises: folders with directory-link loops list each image once
under its real class, an empty folder is named, and damaged files of any kind become error rows."""

import io
import struct

import numpy as np
import pytest
from PIL import Image

from pipeline.data.preprocess import ImageError, Transform, decode, decode_batch
from pipeline.data.sources import DatasetError, DatasetSpec, list_images


def encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def dds_with_unknown_pixel_format() -> bytes:
    """A DDS header whose pixel-format flags are 0: PIL's DDS decoder raises NotImplementedError on it."""
    header = struct.pack("<7I", 124, 0x1007, 8, 8, 0, 0, 0) + bytes(44) + struct.pack("<2I", 32, 0)
    return b"DDS " + header + bytes(124 - len(header)) + bytes(256)


def corpus(count: int, seed: int = 0) -> list[bytes]:
    """`count` seeded mutations (overwritten, deleted and inserted bytes, truncations) of small images in the
    formats PIL reads, the material a fuzzer starts from."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    seeds = [encoded(pixels, fmt) for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")]
    seeds += [encoded(pixels[..., 0], "PNG"), dds_with_unknown_pixel_format()]
    mutated = []
    for _ in range(count):
        data = bytearray(seeds[rng.integers(len(seeds))])
        for _ in range(int(rng.integers(1, 6))):
            at = int(rng.integers(len(data)))
            kind = rng.integers(4)
            if kind == 0:
                data[at] = int(rng.integers(256))
            elif kind == 1:
                del data[at:at + int(rng.integers(1, 16))]
            elif kind == 2:
                data[at:at] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
            else:
                del data[at:]
            if not data:
                break
        mutated.append(bytes(data))
    return mutated


def test_an_unexpected_decoder_exception_is_an_image_error():
    with pytest.raises(ImageError, match="cannot identify an image"):
        decode(dds_with_unknown_pixel_format(), Transform(size=8))  # not a format image datasets hold


def test_no_damaged_file_aborts_a_batch():
    """400 seeded mutations: decode_batch returns every row, each either pixels or an error naming its id."""
    files = corpus(400)
    good = encoded(np.full((12, 12, 3), 7, dtype=np.uint8), "PNG")
    batch = {"index": list(range(len(files) + 1)), "image_id": [f"f{i}" for i in range(len(files))] + ["good"],
             "label": [0] * (len(files) + 1), "image": [*files, good]}
    decoded = decode_batch(batch, Transform(size=8))
    assert len(decoded["error"]) == len(files) + 1 and decoded["error"][-1] == ""
    assert (decoded["pixels"][-1] == 7).all()
    failed = [e for e in decoded["error"] if e]
    assert failed and all(e.split(":")[0].startswith("f") for e in failed)


def digits_folder(root, classes: dict[str, int]):
    for wnid, count in classes.items():
        (root / wnid).mkdir(parents=True)
        for index in range(count):
            (root / wnid / f"img{index}.png").write_bytes(encoded(np.zeros((8, 8, 3), dtype=np.uint8), "PNG"))


def test_directory_link_loops_list_each_image_once_under_its_class(tmp_path, caplog):
    digits_folder(tmp_path, {"n00000000": 1, "n00000001": 4})
    (tmp_path / "n00000000" / "back").symlink_to("..")
    (tmp_path / "n00000001" / "back2").symlink_to("..")  # two loops made the walk exponential
    listing = list_images(DatasetSpec(layout="imagenet_folder", root=str(tmp_path), size=8, id="relative_path"))
    assert listing["image_id"].to_pylist() == ["n00000000/img0.png"] + [f"n00000001/img{i}.png" for i in range(4)]
    assert listing["label"].to_pylist() == [0, 1, 1, 1, 1]
    assert "did not follow 2 directory link(s)" in caplog.text


def test_an_empty_dataset_folder_is_named(tmp_path):
    (tmp_path / "n00000000").mkdir()
    with pytest.raises(DatasetError, match=f"no images under {tmp_path}"):
        list_images(DatasetSpec(layout="imagenet_folder", root=str(tmp_path), size=8))
