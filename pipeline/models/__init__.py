"""Model registry: the demo CNN and torchvision's classifiers, normalisation first inside each model.

Weights load from a path or URI the user gives (`torch.load(weights_only=True)`): a plain state dict, or
a checkpoint holding one under `state_dict` (the published smoothing checkpoints), with the `module.`
and `1.module.` prefixes of DataParallel / Sequential(normalize, model) wrappers removed.
"""

from __future__ import annotations

import io
import logging
import pickle
from typing import Any

import torch
import torchvision
from torch import nn

from pipeline.models.demo import DemoCNN, Normalize, load_demo_model
from pipeline.models.denoisers import Denoised, classifier_digest, load_denoiser
from pipeline.storage import open_location

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

log = logging.getLogger(__name__)

__all__ = ["DemoCNN", "Normalize", "WithFeatures", "load_demo_model", "load_model", "load_state_dict",
           "model_names"]


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


def load_state_dict(uri: str, storage: dict | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a local path or s3:// URI; ValueError naming the file when it cannot be read."""
    location = open_location(uri, **(storage or {}))
    try:
        with location.fs.open_input_stream(location.path) as stream:
            checkpoint = torch.load(io.BytesIO(stream.read()), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as error:
        raise ValueError(f"cannot load model weights from {uri}: {error}") from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{uri} holds no state dict (found {type(checkpoint).__name__})")
    for prefix in ("1.module.", "module."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def load_model(spec: dict[str, Any], storage: dict | None = None) -> nn.Module:
    """The classifier named by a model entry of a run config, in eval mode; with `denoiser: URI`, the
    composition classifier(denoiser(x)) (a trained denoiser artifact, `pipeline.models.denoisers`)."""
    classifier = _load_classifier(spec, storage)
    if not spec.get("denoiser"):
        return classifier
    denoiser, metadata = load_denoiser(spec["denoiser"], storage)
    if metadata.get("classifier", {}).get("sha256") != classifier_digest(classifier):
        log.warning("denoiser %s was trained for another classifier (%s); certifying it in front of %s",
                    spec["denoiser"], metadata.get("classifier", {}).get("spec"), spec.get("name"))
    return Denoised(classifier, denoiser).eval()


def _load_classifier(spec: dict[str, Any], storage: dict | None) -> nn.Module:
    name, weights = spec.get("name"), spec.get("weights")
    if name == "demo_cnn":
        return load_demo_model(weights) if weights else load_demo_model()
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"model.name: unknown model {name!r}; use demo_cnn or a torchvision classifier name")
    network = torchvision.models.get_model(name, weights=None, num_classes=int(spec.get("num_classes", 1000)))
    if weights:
        try:
            network.load_state_dict(load_state_dict(weights, storage))
        except RuntimeError as error:
            raise ValueError(f"model.weights: {weights} does not fit {name}: {error}") from error
    else:
        log.warning("model %s has no weights: certifying a randomly initialised network", name)
    normalize = Normalize(spec.get("mean", IMAGENET_MEAN), spec.get("std", IMAGENET_STD))
    return nn.Sequential(normalize, network).eval()
