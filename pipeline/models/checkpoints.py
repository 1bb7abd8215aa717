"""Checkpoints in the published layouts: reading them (`.safetensors` with safetensors, any other file always
with `torch.load(weights_only=True)`: neither runs pickled code), fitting their
state dicts into a network with an error that names every key that does not fit, and writing them.

The layouts read:
- `{'arch', 'state_dict', ...}` (locuslab/smoothing's and denoised-smoothing's `checkpoint.pth.tar`; any
  other entries but the optimizer state, such as `epoch`, are kept as metadata);
- a plain state dict (torchvision's and timm's weights, off-the-shelf denoisers, the project's demo weights);
in either serialisation of `torch.save` (the zip format, or the legacy one of PyTorch before 1.6), or as a
`.safetensors` file (a plain state dict; timm's and Hugging Face's format).

State dict keys carry the wrappers the network was trained in: `1.` for Sequential(normalize, model) (the
CIFAR classifiers), `1.module.` when the model was also DataParallel (ImageNet), `module.` for
DataParallel alone (the ImageNet denoisers), none otherwise. `fit_state` removes the one prefix, among
those every key carries, under which the keys match the network best.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow.fs as pafs
import torch
from torch import nn

from pipeline.storage import DEFAULT_STORAGE, Storage, StorageError

WRAPPER_PREFIXES = ("", "1.", "module.", "1.module.")
SHOWN = 6  # keys named per kind of mismatch in an error
SAFETENSORS = ".safetensors"

__all__ = [
    "WRAPPER_PREFIXES",
    "Checkpoint",
    "build_to_load",
    "files_sha256",
    "fit_state",
    "read_checkpoint",
    "save_checkpoint",
    "strip_wrappers",
]


@dataclass(frozen=True)
class Checkpoint:
    """A state dict with the architecture name it was saved under (None for a plain state dict) and the
    checkpoint's other entries."""

    uri: str
    state: dict[str, torch.Tensor]
    arch: str | None = None
    metadata: dict = field(default_factory=dict)


def read_checkpoint(uri: str, storage: Storage = DEFAULT_STORAGE) -> Checkpoint:
    """The checkpoint at a local path or s3:// URI (`.safetensors`: read by safetensors); ValueError naming the
    file when it cannot be read or holds no state dict."""
    try:
        location = storage.open(uri)
        if uri.lower().endswith(SAFETENSORS):
            loaded = _read_safetensors(uri, location)
        elif isinstance(location.fs, pafs.LocalFileSystem) and zipfile.is_zipfile(location.path):
            # memory-mapped: the tensors are read once, when they are copied into the network
            loaded = torch.load(location.path, map_location="cpu", weights_only=True, mmap=True)
        else:  # object storage, or the legacy (pre-1.6, not zip) format of older published checkpoints
            with location.fs.open_input_stream(location.path) as stream:
                loaded = torch.load(io.BytesIO(stream.read()), map_location="cpu", weights_only=True)
    except (OSError, StorageError, RuntimeError, pickle.UnpicklingError, EOFError, _SafetensorsError) as error:
        reason = "the file is empty" if isinstance(error, EOFError) else str(error) or type(error).__name__
        raise ValueError(f"cannot load model weights from {uri}: {reason}") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{uri} holds no state dict (found {type(loaded).__name__})")
    if "state_dict" in loaded:
        state = loaded["state_dict"]
        metadata = {key: value for key, value in loaded.items() if key not in ("state_dict", "optimizer")}
    else:
        state, metadata = loaded, {}
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{uri} holds no state dict of tensors under 'state_dict' or at its top level")
    arch = metadata.pop("arch", None)
    if arch is not None and not isinstance(arch, str):
        raise ValueError(f"{uri}: 'arch' must name an architecture, found {type(arch).__name__}")
    return Checkpoint(uri, dict(state), arch, metadata)


class _SafetensorsError(Exception):
    """A `.safetensors` file safetensors cannot read (its own error, re-raised as this)."""


def _read_safetensors(uri: str, location) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file, memory-mapped when local; ValueError naming the extra to install
    when safetensors is missing."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError as error:
        raise ValueError(f"reading {uri} needs safetensors: pip install 'pipeline[timm]' (or safetensors)") from error
    try:
        if isinstance(location.fs, pafs.LocalFileSystem):
            return safetensors.torch.load_file(location.path, device="cpu")
        with location.fs.open_input_stream(location.path) as stream:
            return safetensors.torch.load(stream.read())
    except safetensors.SafetensorError as error:
        raise _SafetensorsError(str(error)) from error


def files_sha256(uris: tuple[str, ...], storage: Storage = DEFAULT_STORAGE) -> str:
    """The SHA-256 of a weights file's bytes (what `sha256sum` prints for it); of several files (the shards
    of one model), the SHA-256 of their `sha256sum` listing: one "<digest>  <name>" line each, in order."""
    digests = [_file_sha256(uri, storage) for uri in uris]
    if len(digests) == 1:
        return digests[0]
    names = [uri.rstrip("/").rsplit("/", 1)[-1] for uri in uris]
    listing = "".join(f"{digest}  {name}\n" for digest, name in zip(digests, names, strict=True))
    return hashlib.sha256(listing.encode()).hexdigest()


def _file_sha256(uri: str, storage: Storage) -> str:
    location = storage.open(uri)

    def read() -> str:
        digest = hashlib.sha256()
        with location.fs.open_input_stream(location.path) as stream:
            while chunk := stream.read(1 << 24):
                digest.update(chunk)
        return digest.hexdigest()

    return location.retrying(read, "hashing")


def strip_wrappers(state: dict[str, torch.Tensor], expected: set[str]) -> tuple[dict[str, torch.Tensor], str]:
    """(state without its wrapper prefix, the prefix): of the prefixes every key carries, the one under which
    most keys are `expected` (the longer one on a tie)."""
    best, best_score = "", -1
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            score = sum(key[len(prefix):] in expected for key in state)
            if score >= best_score:
                best, best_score = prefix, score
    return {key[len(best):]: value for key, value in state.items()}, best


def _listed(keys: list[str]) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def fit_state(network: nn.Module, state: dict[str, torch.Tensor], source: str, target: str) -> None:
    """Loads `state` (wrapper prefixes removed) into `network`, every key and shape checked; ValueError
    "`source` does not fit `target`: missing keys ...; unexpected keys ...; mis-shaped keys ..." otherwise."""
    own = network.state_dict()
    state, prefix = strip_wrappers(state, set(own))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = [f"{key} {list(state[key].shape)} (the network's: {list(own[key].shape)})"
                 for key in own if key in state and state[key].shape != own[key].shape]
    problems = [f"{kind} keys {_listed(keys)}" for kind, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    if problems:
        where = f" (keys read after removing the prefix {prefix!r})" if prefix else ""
        raise ValueError(f"{source} does not fit {target}{where}: " + "; ".join(problems))
    network.load_state_dict(state)


def build_to_load(build: Callable[[], nn.Module]) -> nn.Module:
    """The network `build` makes, with its tensors allocated but not initialised, when every tensor of it is
    in its state dict (so `fit_state` overwrites them all); else built and initialised as usual. Skips the
    initialisation a checkpoint replaces (DnCNN's orthogonal one costs seconds)."""
    with torch.device("meta"):
        network = build()
    tensors = {name for name, _ in network.named_parameters()} | {name for name, _ in network.named_buffers()}
    if tensors <= set(network.state_dict()):
        return network.to_empty(device="cpu")
    return build()


def save_checkpoint(path, network: nn.Module, arch: str, prefix: str = "1.", **metadata) -> None:
    """Writes `network` in the published layout: {'arch', 'state_dict' (keys under `prefix`), **metadata},
    readable by `read_checkpoint` and by the authors' own loaders."""
    state = {f"{prefix}{key}": value.detach().cpu() for key, value in network.state_dict().items()}
    torch.save({**metadata, "arch": arch, "state_dict": state}, path)
