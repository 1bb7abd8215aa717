"""Hugging Face image classifiers from a `save_pretrained` folder, local or s3:// (`model.name: huggingface`,
`model.weights: FOLDER`).

The folder's `config.json` names the architecture, and transformers' own loader
(`AutoModelForImageClassification.from_pretrained`, local files only: nothing is downloaded; an s3:// folder
is copied to a temporary one first) builds it and reads its weights, without pickle (`model.safetensors`,
sharded ones through their `.index.json`; `pytorch_model.bin` with `torch.load(weights_only=True)`) and
with the key renames of its own versions; a weight missing, left over or mis-shaped is an error naming it,
not transformers' warning. The `preprocessor_config.json` gives the normalisation and input size the
classifier was trained behind (`image_mean`, `image_std`; `crop_size`, else `size`), which a config can
override. The model returns the logits of transformers' own model for pixel values preprocessed by its own
image processor.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.models.architectures import CLASSIFIER, Architecture
from pipeline.storage import Location, Storage

HF_NAME = "huggingface"
HF_MISSING = "Hugging Face classifiers need transformers: pip install 'pipeline[huggingface]'"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

__all__ = ["HF_MISSING", "HF_NAME", "HFClassifier", "HFFolder", "is_hf_folder", "read_folder"]


class HFClassifier(nn.Module):
    """A transformers image classifier whose forward takes pixel values and returns its logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).logits


@dataclass(frozen=True)
class HFFolder:
    """What a `save_pretrained` folder holds: its model config, its image processor's config (empty when
    it has none), its weights files (URIs, in the order of their index) and any index of them."""

    uri: str
    config: dict
    processor: dict
    weights: tuple[str, ...]
    index: str | None
    storage: Storage

    @property
    def num_classes(self) -> int:
        labels = self.config.get("id2label")
        return int(self.config.get("num_labels") or (len(labels) if labels else 2))

    @property
    def input_size(self) -> tuple[int, int, int] | None:
        """(C, H, W) the image processor hands the model: its centre crop, else its resize target, else
        the model config's `image_size`."""
        channels = int(self.config.get("num_channels", 3))
        for key in ("crop_size", "size"):
            size = self.processor.get(key)
            if isinstance(size, dict) and "height" in size and "width" in size:
                return channels, int(size["height"]), int(size["width"])
            if isinstance(size, dict) and "shortest_edge" in size and key == "crop_size":
                return channels, int(size["shortest_edge"]), int(size["shortest_edge"])
            if isinstance(size, int):
                return channels, size, size
        side = self.config.get("image_size")
        return (channels, int(side), int(side)) if isinstance(side, int) else None

    def normalisation(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """The processor's (image_mean, image_std), or (None, None) where it does not normalise; an input
        the processor rescales by anything but 1/255 is refused, as the model sees [0, 1] pixels."""
        factor = self.processor.get("rescale_factor", 1 / 255)
        if self.processor.get("do_rescale", True) and abs(factor - 1 / 255) > 1e-12:
            raise ValueError(f"model.weights: {self.uri}: the image processor rescales pixels by {factor}, "
                             f"not 1/255; give model.mean and model.std for [0, 1] pixels")
        if not self.processor.get("do_normalize", bool(self.processor)):
            return None, None
        mean, std = self.processor.get("image_mean"), self.processor.get("image_std")
        if mean is None or std is None:
            return None, None
        channels = int(self.config.get("num_channels", 3))
        return _per_channel(mean, channels), _per_channel(std, channels)

    def architecture(self) -> Architecture:
        """The Architecture whose `build(num_classes)` is transformers' model with the folder's weights,
        with the processor's normalisation and input size."""
        mean, std = self.normalisation()
        model_type = self.config.get("model_type")
        name = (self.config.get("architectures") or [model_type])[0]
        return Architecture(f"{HF_NAME}/{name}", CLASSIFIER, self._load, mean, std, self.num_classes,
                            family=HF_NAME, input_size=self.input_size)

    def _load(self, classes: int) -> nn.Module:
        try:
            import transformers
        except ImportError as error:
            raise ValueError(HF_MISSING) from error
        if classes != self.num_classes:
            raise ValueError(f"model.num_classes is {classes}, but {self.uri}/config.json has {self.num_classes} "
                             f"labels; remove model.num_classes")
        with tempfile.TemporaryDirectory(prefix="hf-classifier-") as scratch, _quiet(transformers):
            folder = self._local(Path(scratch))
            try:
                model, info = transformers.AutoModelForImageClassification.from_pretrained(
                    folder, local_files_only=True, output_loading_info=True)
            except (ValueError, OSError, KeyError) as error:
                raise ValueError(f"model.weights: {self.uri} cannot be loaded as an image classifier by "
                                 f"transformers {transformers.__version__}: {_first_line(error)}") from error
        problems = [f"{kind.replace('_', ' ')} {', '.join(sorted(map(str, keys))[:6])}"
                    for kind, keys in info.items()
                    if keys and kind in ("missing_keys", "unexpected_keys", "mismatched_keys")]
        if problems:
            raise ValueError(f"model.weights: {self.uri} does not fit its config's {type(model).__name__}: "
                             + "; ".join(problems))
        return HFClassifier(model.float())

    def _local(self, scratch: Path) -> str:
        """The folder on the local filesystem: itself, or its files copied into `scratch`."""
        folder = self.storage.open(self.uri)
        if not self.uri.startswith("s3://"):
            return folder.path
        names = ["config.json", *([self.index] if self.index else []),
                 *(uri.rsplit("/", 1)[-1] for uri in self.weights)]
        for name in names:
            (scratch / name).write_bytes(folder.read_bytes(name))
        return str(scratch)


@contextlib.contextmanager
def _quiet(transformers):
    """transformers without its progress bar and its notices (what matters is raised, not logged)."""
    logging, bars = transformers.utils.logging, transformers.utils.logging.is_progress_bar_enabled()
    verbosity = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _per_channel(value, channels: int) -> tuple[float, ...]:
    return tuple(float(x) for x in value) if isinstance(value, list) else (float(value),) * channels


def is_hf_folder(uri: str, storage: Storage) -> bool:
    """True when `uri` is a folder (local, or an s3:// prefix) holding a `config.json`."""
    try:
        return storage.open(uri).join("config.json").exists()
    except (OSError, ValueError):
        return False


def read_folder(uri: str, storage: Storage) -> HFFolder:
    """The `save_pretrained` folder at `uri`; ValueError naming what is missing otherwise."""
    folder = storage.open(uri)
    if not _has(folder, "config.json"):
        raise ValueError(f"model.weights: {uri} is not a Hugging Face save_pretrained folder (no config.json)")
    config = _json(folder, "config.json")
    processor = _json(folder, "preprocessor_config.json") if _has(folder, "preprocessor_config.json") else {}
    if "model_type" not in config:
        raise ValueError(f"model.weights: {folder.join('config.json').uri} has no model_type")
    index, weights = _weights_files(folder, uri)
    return HFFolder(uri, config, processor, weights, index, storage)


def _weights_files(folder: Location, uri: str) -> tuple[str | None, tuple[str, ...]]:
    """(the index file's name or None, the weights files' URIs) of a folder."""
    for index in INDEXES:
        if _has(folder, index):
            shards = sorted(set(_json(folder, index).get("weight_map", {}).values()))
            return index, tuple(folder.join(shard).uri for shard in shards)
    for name in WEIGHT_FILES:
        if _has(folder, name):
            return None, (folder.join(name).uri,)
    raise ValueError(f"model.weights: {uri} holds no weights: none of {', '.join(WEIGHT_FILES + INDEXES)}")


def _has(folder: Location, name: str) -> bool:
    return folder.join(name).exists()


def _json(folder: Location, name: str) -> dict:
    try:
        loaded = json.loads(folder.read_bytes(name))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"model.weights: cannot read {folder.join(name).uri}: {error}") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"model.weights: {folder.join(name).uri} is not a JSON object")
    return loaded
