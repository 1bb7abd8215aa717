"""The architectures a config can name, with the normalisation each is trained behind, and the names the
published checkpoints give them.

| project name | network | published `arch` | normalisation in front |
|---|---|---|---|
| `demo_cnn` | `DemoCNN` (normalises inside) | | none |
| `cifar_resnet20`, `cifar_resnet110` | `CifarResNet(20 / 110)` | the same | CIFAR-10 |
| `cifar_wrn28_10`, `cifar_wrn40_10` | `WideResNet(28 / 40, 10)` | `cifar_wrn`, `cifar_wrn40` | CIFAR-10 |
| any torchvision classifier (`resnet50`, ...) | torchvision's | the same | ImageNet |
| `timm/<architecture>[.<tag>]` (`timm/vit_base_patch16_224`) | timm's, untrained | | timm's `pretrained_cfg` |
| `dncnn` (denoiser) | `DnCNN(17, 64)` | `cifar_dncnn`, `imagenet_dncnn` | none |
| `dncnn_wide` (denoiser) | `DnCNN(17, 128)` | `cifar_dncnn_wide` | none |
| `memnet` (denoiser) | `MemNet(3, 64, 3, 6)` | `memnet`, `imagenet_memnet` | none |

The constants are the authors' (`get_normalize_layer`): CIFAR-10 mean 0.4914 0.4822 0.4465, std 0.2023
0.1994 0.2010; ImageNet mean 0.485 0.456 0.406, std 0.229 0.224 0.225. The project's DnCNN
(`pipeline.models.denoisers`) is the published one: its artifacts and Salman et al.'s checkpoints build
the same network.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.models.cifar import CifarResNet, WideResNet
from pipeline.models.demo import DemoCNN
from pipeline.models.denoisers import DnCNN
from pipeline.models.memnet import MemNet

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSIFIER, DENOISER = "classifier", "denoiser"
TIMM_PREFIX = "timm/"
TIMM_MISSING = "timm/ models need timm and safetensors: pip install 'pipeline[timm]'"

__all__ = ["ARCHITECTURES", "CIFAR10_MEAN", "CIFAR10_STD", "CLASSIFIER", "DENOISER", "IMAGENET_MEAN", "IMAGENET_STD",
           "PUBLISHED_NAMES", "TIMM_PREFIX", "Architecture", "architecture", "classifier_names", "infer_denoiser",
           "is_classifier_name"]


@dataclass(frozen=True)
class Architecture:
    """A buildable network: `kind` (classifier or denoiser), `build(num_classes)`, the normalisation put in
    front of it (`mean`, `std`; None when it takes [0, 1] pixels itself), its default class count (None: read
    from the weights' `head` weight, else `fallback_classes`), its `family` (project, torchvision, timm) and
    the (C, H, W) input it was trained on, where its library says."""

    name: str
    kind: str
    build: Callable[[int], nn.Module]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    num_classes: int | None = None
    family: str = "project"
    input_size: tuple[int, int, int] | None = None
    head: str | None = None
    fallback_classes: int | None = None

    def classes_in(self, state: dict[str, torch.Tensor]) -> int | None:
        """The class count of weights (wrapper prefixes removed) for an architecture without a default: the
        rows of its `head` weight; None when the weights hold no such head."""
        weight = state.get(f"{self.head}.weight") if self.head else None
        return int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else None


def _cifar(name: str, build: Callable[[int], nn.Module]) -> Architecture:
    return Architecture(name, CLASSIFIER, build, CIFAR10_MEAN, CIFAR10_STD, 10)


def _denoiser(name: str, build: Callable[[], nn.Module]) -> Architecture:
    return Architecture(name, DENOISER, lambda _classes: build())


ARCHITECTURES = {arch.name: arch for arch in (
    Architecture("demo_cnn", CLASSIFIER, lambda classes: DemoCNN(num_classes=classes), num_classes=10),
    _cifar("cifar_resnet20", lambda classes: CifarResNet(20, classes)),
    _cifar("cifar_resnet110", lambda classes: CifarResNet(110, classes)),
    _cifar("cifar_wrn28_10", lambda classes: WideResNet(28, 10, classes)),
    _cifar("cifar_wrn40_10", lambda classes: WideResNet(40, 10, classes)),
    _denoiser("dncnn", lambda: DnCNN(depth=17, channels=64)),
    _denoiser("dncnn_wide", lambda: DnCNN(depth=17, channels=128)),
    _denoiser("memnet", lambda: MemNet(3, 64, 3, 6)),
)}

# the published `arch` of each architecture, where it differs from the project's name
PUBLISHED_NAMES = {"cifar_wrn": "cifar_wrn28_10", "cifar_wrn40": "cifar_wrn40_10", "cifar_dncnn": "dncnn",
                   "imagenet_dncnn": "dncnn", "cifar_dncnn_wide": "dncnn_wide", "imagenet_memnet": "memnet"}


def _torchvision(name: str) -> Architecture:
    import torchvision

    return Architecture(name, CLASSIFIER, lambda classes: torchvision.models.get_model(name, weights=None,
                                                                                       num_classes=classes),
                        IMAGENET_MEAN, IMAGENET_STD, 1000, family="torchvision")


def _timm(name: str) -> Architecture:
    """`timm/<architecture>[.<tag>]`: timm's network, built with `pretrained=False` (nothing is downloaded),
    with the normalisation, input size and head of its `pretrained_cfg` (the tag's, else the default one)."""
    try:
        import timm
    except ImportError as error:
        raise ValueError(TIMM_MISSING) from error
    model_name = name[len(TIMM_PREFIX):]
    listing = "list timm's names with python -c \"import timm; print(timm.list_models('*vit*'))\""
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm architecture {model_name!r}; {listing}")
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except RuntimeError as error:  # an unknown tag
        raise ValueError(f"{name!r}: {error} ({listing}, pretrained=True for the tags)") from error
    cfg = cfg or timm.models.PretrainedCfg()
    head = cfg.classifier[0] if isinstance(cfg.classifier, (tuple, list)) else cfg.classifier
    fallback = cfg.num_classes or 1000

    def build(classes: int | None) -> nn.Module:
        return timm.create_model(model_name, pretrained=False, num_classes=fallback if classes is None else classes)

    return Architecture(name, CLASSIFIER, build, tuple(cfg.mean), tuple(cfg.std), None, family="timm",
                        input_size=tuple(cfg.input_size), head=head, fallback_classes=fallback)


def architecture(name: str) -> Architecture:
    """The architecture of a project name, a published `arch`, a torchvision classifier or `timm/<name>`;
    ValueError listing the known names otherwise (saying how to install timm, where it is missing)."""
    if name.startswith(TIMM_PREFIX):
        return _timm(name)
    name = PUBLISHED_NAMES.get(name, name)
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    if name in _torchvision_classifiers():
        return _torchvision(name)
    raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}, the published names "
                     f"{sorted(PUBLISHED_NAMES)}, torchvision's classifiers and timm/<architecture>")


def is_classifier_name(name: str) -> bool:
    """True for a name `classifier_names` lists; torchvision is imported only for a name that is not the
    project's (so the default config never pays for it)."""
    own = ARCHITECTURES.get(PUBLISHED_NAMES.get(name, name))
    return own.kind == CLASSIFIER if own is not None else name in _torchvision_classifiers()


def classifier_names() -> list[str]:
    """Every name `model.name` accepts, but timm's (`timm/<architecture>`, listed by `timm.list_models()`)."""
    own = [name for name, arch in ARCHITECTURES.items() if arch.kind == CLASSIFIER]
    published = [name for name, own_name in PUBLISHED_NAMES.items() if ARCHITECTURES[own_name].kind == CLASSIFIER]
    return [*own, *published, *_torchvision_classifiers()]


def _torchvision_classifiers() -> list[str]:
    """torchvision's classifier names (torchvision is imported here, on first need: it takes seconds)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _indices(keys: list[str], pattern: str) -> set[int]:
    return {int(match.group(1)) for key in keys if (match := re.fullmatch(pattern, key))}


def infer_denoiser(state: dict[str, torch.Tensor]) -> nn.Module:
    """The denoiser a plain state dict (wrapper prefixes removed) was saved from, sized by its shapes: a
    DnCNN (`dncnn.*` keys) or a MemNet (`feature_extractor.*`, `dense_memory.*`); ValueError otherwise."""
    keys = list(state)
    if "dncnn.0.weight" in state:
        first = state["dncnn.0.weight"]
        depth = sum(1 for key in keys if key.startswith("dncnn.") and key.endswith(".weight")
                    and state[key].dim() == 4)
        return DnCNN(image_channels=first.shape[1], depth=depth, channels=first.shape[0])
    if "feature_extractor.conv.weight" in state:
        first = state["feature_extractor.conv.weight"]
        memory = _indices(keys, r"dense_memory\.(\d+)\..*")
        residual = _indices(keys, r"dense_memory\.0\.recursive_unit\.(\d+)\..*")
        if not memory or not residual:
            raise ValueError("a MemNet state dict needs dense_memory.<m>.recursive_unit.<r> keys")
        return MemNet(first.shape[1], first.shape[0], max(memory) + 1, max(residual) + 1)
    raise ValueError(f"cannot tell which denoiser the keys {keys[:3]}... belong to (a DnCNN's start with 'dncnn.', "
                     f"a MemNet's with 'feature_extractor.'); give a checkpoint with its 'arch'")
