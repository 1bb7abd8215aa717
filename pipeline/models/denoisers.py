"""Denoisers for pretrained classifiers (Salman et al. 2020): DnCNN, the classifier-denoiser composition,
and the denoiser artifact (weights + a description, with the digest of the classifier it was trained for).

DnCNN predicts the noise and subtracts it: D(z) = z - dncnn(z). Its last convolution starts at zero, so
a fresh denoiser is the identity. The defaults are the papers' (17 layers, 64 channels; the wide variant
has 128); `depth` and `channels` scale it down for small inputs. It is the network of Salman et al.'s
`cifar_dncnn` / `imagenet_dncnn` checkpoints, module for module (`dncnn.<i>` keys, BatchNorm eps 1e-4), so
their checkpoints and the artifacts made here load into the same class (`pipeline.models.architectures`).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import time
from pathlib import Path

import torch
from torch import nn

from pipeline.models.checkpoints import build_to_load, fit_state
from pipeline.storage import DEFAULT_STORAGE, Storage

ARTIFACT_VERSION = 1

__all__ = ["ARTIFACT_VERSION", "Denoised", "DnCNN", "classifier_digest", "load_denoiser", "save_artifact"]


class DnCNN(nn.Module):
    """conv+ReLU, (depth - 2) x [conv + BatchNorm + ReLU], conv; residual output, orthogonal init."""

    def __init__(self, image_channels: int = 3, depth: int = 17, channels: int = 64, wide: bool = False):
        super().__init__()
        if depth < 3:
            raise ValueError(f"DnCNN depth must be at least 3, got {depth}")
        channels = 128 if wide else channels
        layers: list[nn.Module] = [nn.Conv2d(image_channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            # momentum 0.95 as in the reference implementation (running statistics follow the latest batch)
            layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(channels, eps=1e-4, momentum=0.95), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(channels, image_channels, 3, padding=1, bias=False))
        self.dncnn = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.orthogonal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(layers[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.dncnn(x)


class Denoised(nn.Module):
    """classifier(denoiser(x)): the base classifier that denoised smoothing certifies. Behind a
    noise-conditioned denoiser (a diffusion model, `denoiser(x, sigma)`) it is noise-conditioned itself:
    `forward(x, sigma)` with each row's noise level (None: clean inputs, sigma 0)."""

    def __init__(self, classifier: nn.Module, denoiser: nn.Module):
        super().__init__()
        self.classifier, self.denoiser = classifier, denoiser
        self.noise_conditioned = bool(getattr(denoiser, "noise_conditioned", False))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        if not self.noise_conditioned:
            return self.classifier(self.denoiser(x))
        sigma = torch.zeros(len(x), device=x.device) if sigma is None else sigma
        return self.classifier(self.denoiser(x, sigma))


def classifier_digest(model: nn.Module) -> str:
    """sha256 (24 hex digits) over a model's state dict: names and tensor bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def save_artifact(directory: Path, denoiser: nn.Module, classifier: nn.Module, description: dict) -> None:
    """Writes denoiser.pt (the state dict) and artifact.json: `description` (what it is and how it was made,
    its `classifier` the spec of the classifier it was trained for), plus that classifier's digest, the
    artifact version and the time."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(denoiser.state_dict(), directory / "denoiser.pt")
    metadata = {**description, "version": ARTIFACT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "classifier": {"spec": description.get("classifier"), "sha256": classifier_digest(classifier)}}
    (directory / "artifact.json").write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))


def load_denoiser(uri: str, storage: Storage = DEFAULT_STORAGE) -> tuple[DnCNN, dict]:
    """(denoiser in eval mode, its artifact.json) from a directory or s3:// prefix; ValueError naming what
    does not fit."""
    location = storage.open(uri)
    try:
        metadata = json.loads(location.read_bytes("artifact.json"))
        state = torch.load(io.BytesIO(location.read_bytes("denoiser.pt")), map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        reason = "denoiser.pt is empty" if isinstance(error, EOFError) else str(error) or type(error).__name__
        raise ValueError(f"cannot load a denoiser artifact from {uri}: {reason}") from error
    architecture = {key: value for key, value in metadata.get("architecture", {}).items() if key != "name"}
    denoiser = build_to_load(lambda: DnCNN(**architecture))
    fit_state(denoiser, state, f"denoiser checkpoint {uri}", f"DnCNN({architecture})")
    return denoiser.eval(), metadata
