"""Model registry: the demo CNN and torchvision's classifiers, normalisation first inside each model.

Weights load from a path or URI the user gives (`torch.load(weights_only=True)`): a plain state dict, or
a checkpoint holding one under `state_dict` (the published smoothing checkpoints), with the `module.`
and `1.module.` prefixes of DataParallel / Sequential(normalize, model) wrappers removed.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import pickle
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from pipeline.models.demo import DemoCNN, Normalize, load_demo_model
from pipeline.models.denoisers import Denoised, classifier_digest, load_denoiser
from pipeline.storage import DEFAULT_STORAGE, Storage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

log = logging.getLogger(__name__)

__all__ = ["DemoCNN", "ModelSpec", "Normalize", "WithFeatures", "load_demo_model", "load_model", "load_state_dict",
           "model_names"]


@dataclass(frozen=True)
class ModelSpec:
    """A model entry of a config: a registry `name` (demo_cnn or a torchvision classifier), `weights` (a path
    or URI; none: the demo's shipped weights, or a random torchvision network), the normalisation put in
    front (`mean`, `std`; ImageNet's by default), `num_classes`, and a `denoiser` artifact to put in front of
    the classifier."""

    name: str = "demo_cnn"
    weights: str | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    num_classes: int = 1000
    denoiser: str | None = None

    def __post_init__(self) -> None:
        for key in ("mean", "std"):
            value = getattr(self, key)
            if isinstance(value, list | tuple):
                object.__setattr__(self, key, tuple(value))

    @classmethod
    def keys(cls) -> set[str]:
        return {field.name for field in dataclasses.fields(cls)}


class WithFeatures(nn.Module):
    """A classifier whose forward returns (logits, penultimate features): the input of its last nn.Linear,
    taken with a forward hook, so any registry model (torchvision's included) exposes its features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
        if not linears:
            raise ValueError(f"{type(model).__name__} has no nn.Linear layer to take penultimate features from")
        self.model, self._last = model, linears[-1]

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured = []
        handle = self._last.register_forward_hook(lambda module, args, output: captured.append(args[0]))
        try:
            logits = self.model(inputs)
        finally:
            handle.remove()
        return logits, captured[-1].flatten(1)


def model_names() -> list[str]:
    return ["demo_cnn", *torchvision.models.list_models(module=torchvision.models)]


def load_state_dict(uri: str, storage: Storage = DEFAULT_STORAGE) -> dict[str, torch.Tensor]:
    """A state dict from a local path or s3:// URI; ValueError naming the file when it cannot be read."""
    location = storage.open(uri)
    try:
        with location.fs.open_input_stream(location.path) as stream:
            checkpoint = torch.load(io.BytesIO(stream.read()), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as error:
        reason = "the file is empty" if isinstance(error, EOFError) else str(error) or type(error).__name__
        raise ValueError(f"cannot load model weights from {uri}: {reason}") from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{uri} holds no state dict (found {type(checkpoint).__name__})")
    for prefix in ("1.module.", "module."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def load_model(spec: ModelSpec, storage: Storage = DEFAULT_STORAGE) -> nn.Module:
    """The classifier a model spec names, in eval mode; with a `denoiser`, the composition
    classifier(denoiser(x)) (a trained denoiser artifact, `pipeline.models.denoisers`)."""
    classifier = _load_classifier(spec, storage)
    if not spec.denoiser:
        return classifier
    denoiser, metadata = load_denoiser(spec.denoiser, storage)
    if metadata.get("classifier", {}).get("sha256") != classifier_digest(classifier):
        log.warning("denoiser %s was trained for another classifier (%s); certifying it in front of %s",
                    spec.denoiser, metadata.get("classifier", {}).get("spec"), spec.name)
    return Denoised(classifier, denoiser).eval()


def _load_classifier(spec: ModelSpec, storage: Storage) -> nn.Module:
    if spec.name == "demo_cnn":
        return load_demo_model(spec.weights) if spec.weights else load_demo_model()
    if spec.name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"model.name: unknown model {spec.name!r}; use demo_cnn or a torchvision classifier name")
    network = torchvision.models.get_model(spec.name, weights=None, num_classes=int(spec.num_classes))
    if spec.weights:
        try:
            network.load_state_dict(load_state_dict(spec.weights, storage))
        except RuntimeError as error:
            raise ValueError(f"model.weights: {spec.weights} does not fit {spec.name}: {error}") from error
    else:
        log.warning("model %s has no weights: certifying a randomly initialised network", spec.name)
    return nn.Sequential(Normalize(spec.mean, spec.std), network).eval()
