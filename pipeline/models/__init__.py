"""Model registry: the demo CNN, the published CIFAR classifiers, torchvision's and timm's classifiers and
the denoisers (`pipeline.models.architectures`), each with its normalisation first inside the model.

Weights load from a path or URI the user gives, `.safetensors` with safetensors and any other file always
with `torch.load(weights_only=True)` (`pipeline.models.checkpoints`): a plain state dict, or a published
`{'arch', 'state_dict', ...}` checkpoint, with the `1.`, `module.` and `1.module.` prefixes of
Sequential(normalize, model) and DataParallel wrappers removed. `model: {weights: PATH}` alone builds the
checkpoint's `arch`; with a `name` as well, the two must agree.
"""

from __future__ import annotations

import logging
from typing import Annotated

import pyarrow.fs as pafs
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from pipeline.models.architectures import (
    CLASSIFIER,
    DENOISER,
    TIMM_PREFIX,
    Architecture,
    architecture,
    classifier_names,
    infer_denoiser,
)
from pipeline.models.checkpoints import Checkpoint, build_to_load, fit_state, read_checkpoint, strip_wrappers
from pipeline.models.demo import WEIGHTS, DemoCNN, Normalize, load_demo_model
from pipeline.models.denoisers import Denoised, classifier_digest, load_denoiser
from pipeline.sections import Count, Listed, Number, Section
from pipeline.storage import DEFAULT_STORAGE, Storage

log = logging.getLogger(__name__)

__all__ = ["DemoCNN", "ModelSpec", "Normalize", "WithFeatures", "load_any_denoiser",
           "load_demo_model", "load_model", "load_state_dict", "model_names"]


class ModelSpec(Section):
    """A model entry of a config: a registry `name` (`model_names()`, or `timm/<architecture>`; none with
    `weights`: the checkpoint's `arch`; neither: the demo CNN), `weights` (a path or URI; none: the demo's
    shipped weights, or a random network), the normalisation put in front (`mean`, `std`; default: the
    architecture's, CIFAR-10's or ImageNet's, timm's `pretrained_cfg` for `timm/` names), `num_classes`
    (default: the architecture's; for `timm/` names, the rows of the weights' classifier head, else timm's
    default; the demo CNN's shipped weights have 10, and another count is refused), and a `denoiser` in front
    of the classifier (a project artifact or a published denoiser checkpoint). A spec that exists is valid
    (its weights are read when the model is loaded: without a name, their `arch` names the architecture)."""

    name: str | None = None
    weights: Annotated[str, Field(min_length=1)] | None = None
    mean: Annotated[tuple[Number, ...], Listed] | None = None
    std: Annotated[tuple[Number, ...], Listed] | None = None
    num_classes: Count | None = Field(None, ge=1)
    denoiser: Annotated[str, Field(min_length=1)] | None = None

    def __init__(self, name: str | None = None, /, **values):
        super().__init__(**({"name": name} if name is not None else {}), **values)

    @classmethod
    def keys(cls) -> set[str]:
        return set(cls.model_fields)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data):
        """The demo CNN without a name or weights; the architecture's normalisation and class count where the
        entry gives none (an unknown name is left for `_check` to report)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("name") is None and data.get("weights") is None:
            data["name"] = "demo_cnn"
        if data.get("name") == "demo_cnn" and (data.get("mean") is not None or data.get("std") is not None):
            raise ValueError("{where}: demo_cnn normalises inside itself; remove {where}.mean and {where}.std")
        if data.get("name") == "demo_cnn" and data.get("weights") is None and data.get("num_classes") not in (None, 10):
            raise ValueError(f"{{where}}.num_classes: demo_cnn's shipped weights have 10 classes, got "
                             f"{data['num_classes']!r}; remove {{where}}.num_classes, or give {{where}}.weights "
                             f"trained for that many classes")
        try:
            arch = architecture(data["name"]) if isinstance(data.get("name"), str) else None
        except ValueError:
            arch = None
        for key in ("mean", "std", "num_classes") if arch else ():
            if data.get(key) is None:
                data[key] = getattr(arch, key)
        return data

    @field_validator("name")
    @classmethod
    def _known(cls, name: str | None) -> str | None:
        if name is not None and name.startswith(TIMM_PREFIX):
            try:
                architecture(name)
            except ValueError as error:
                raise ValueError(f"{{where}}: {error}") from error
        elif name is not None and name not in model_names():
            raise ValueError(f"{{where}}: unknown model {name!r}; use demo_cnn, a CIFAR architecture (cifar_resnet20, "
                             f"cifar_resnet110, cifar_wrn28_10, cifar_wrn40_10), a torchvision classifier name or "
                             f"timm/<architecture> (e.g. timm/vit_base_patch16_224)")
        return name

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if (self.mean is None) != (self.std is None):
            raise ValueError("{where}: give both mean and std, or neither")
        if self.std is not None:
            if not all(value > 0 for value in self.std):
                raise ValueError(f"{{where}}.std must hold finite numbers > 0 (the input is divided by it), got "
                                 f"{list(self.std)}")
            if len(self.mean) != len(self.std):
                raise ValueError(f"{{where}}: mean and std must have one value per channel, got {len(self.mean)} and "
                                 f"{len(self.std)}")
        return self


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
    """The classifier names a config can give (project names, published `arch` names, torchvision's); timm's,
    as `timm/<architecture>`, are timm's own list (`timm.list_models()`)."""
    return classifier_names()


def load_state_dict(uri: str, storage: Storage = DEFAULT_STORAGE) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint at a local path or s3:// URI, the longest wrapper prefix all its keys
    carry removed; ValueError naming the file when it cannot be read."""
    return strip_wrappers(read_checkpoint(uri, storage).state, set())[0]


def load_model(spec: ModelSpec, storage: Storage = DEFAULT_STORAGE) -> nn.Module:
    """The classifier a model spec names, in eval mode; with a `denoiser`, the composition
    classifier(denoiser(x))."""
    classifier = _load_classifier(spec, storage)
    if not spec.denoiser:
        return classifier
    denoiser, metadata = load_any_denoiser(spec.denoiser, storage)
    trained_for = metadata.get("classifier")
    if trained_for is not None and trained_for.get("sha256") != classifier_digest(classifier):
        log.warning("denoiser %s was trained for another classifier (%s); certifying it in front of %s",
                    spec.denoiser, trained_for.get("spec"), spec.name or spec.weights)
    return Denoised(classifier, denoiser).eval()


def _resolve(spec: ModelSpec, checkpoint: Checkpoint | None) -> Architecture:
    """The architecture to build: `model.name`, else the checkpoint's `arch`; both given, they must agree."""
    arch = checkpoint.arch if checkpoint is not None else None
    if spec.name is None and arch is None:
        raise ValueError(f"model.weights: {spec.weights} is a plain state dict with no 'arch'; name its "
                         f"architecture with model.name")
    try:
        chosen = architecture(spec.name if spec.name is not None else arch)
    except ValueError as error:
        where = "model.name" if spec.name is not None else f"model.weights: {spec.weights} ('arch')"
        raise ValueError(f"{where}: {error}") from error
    if spec.name is not None and arch is not None:
        try:
            saved = architecture(arch).name
        except ValueError:
            saved = arch
        if saved != chosen.name:
            raise ValueError(f"model.name is {spec.name!r}, but {spec.weights} holds a {arch!r} checkpoint; "
                             f"drop model.name to build the checkpoint's architecture, or give its weights")
    if chosen.kind != CLASSIFIER:
        raise ValueError(f"{chosen.name} is a denoiser; give it as model.denoiser, in front of a classifier")
    return chosen


def _load_classifier(spec: ModelSpec, storage: Storage) -> nn.Module:
    if spec.weights is None and spec.name == "demo_cnn":
        return load_demo_model(WEIGHTS)
    checkpoint = read_checkpoint(spec.weights, storage) if spec.weights else None
    arch = _resolve(spec, checkpoint)
    num_classes = spec.num_classes if spec.num_classes is not None else _default_classes(arch, checkpoint)
    if checkpoint is not None:
        network = build_to_load(lambda: arch.build(int(num_classes)))
        fit_state(network, checkpoint.state, f"model.weights: {spec.weights}", arch.name)
    else:
        network = arch.build(int(num_classes))
        log.warning("model %s has no weights: certifying a randomly initialised network", arch.name)
    mean = spec.mean if spec.mean is not None else arch.mean
    std = spec.std if spec.std is not None else arch.std
    if mean is None:
        return network.eval()
    return nn.Sequential(Normalize(mean, std), network).eval()


def _default_classes(arch: Architecture, checkpoint: Checkpoint | None) -> int:
    """The class count of an architecture's default, else of its weights' head, else of its library's."""
    if arch.num_classes is not None:
        return arch.num_classes
    found = arch.classes_in(strip_wrappers(checkpoint.state, {f"{arch.head}.weight"})[0]) if checkpoint else None
    return found if found is not None else arch.fallback_classes


def load_any_denoiser(uri: str, storage: Storage = DEFAULT_STORAGE) -> tuple[nn.Module, dict]:
    """(denoiser in eval mode, what is known of it): a project artifact (a directory or prefix with
    artifact.json, `pipeline.models.denoisers`) or a published denoiser checkpoint (a file: Salman et al.'s
    {'arch', 'state_dict'}, or a plain DnCNN / MemNet state dict, sized by its shapes)."""
    location = storage.open(uri)
    try:
        is_file = location.fs.get_file_info(location.path).type == pafs.FileType.File
    except OSError as error:
        raise ValueError(f"model.denoiser: cannot reach {uri}: {error}") from error
    if not is_file:
        return load_denoiser(uri, storage)
    checkpoint = read_checkpoint(uri, storage)
    if checkpoint.arch is None:
        plain, _ = strip_wrappers(checkpoint.state, {"dncnn.0.weight", "feature_extractor.conv.weight"})
        try:
            network = build_to_load(lambda: infer_denoiser(plain))
        except ValueError as error:
            raise ValueError(f"model.denoiser: {uri}: {error}") from error
    else:
        try:
            arch = architecture(checkpoint.arch)
        except ValueError as error:
            raise ValueError(f"model.denoiser: {uri} ('arch'): {error}") from error
        if arch.kind != DENOISER:
            raise ValueError(f"model.denoiser: {uri} holds a {checkpoint.arch!r} classifier, not a denoiser")
        network = build_to_load(lambda: arch.build(0))
    fit_state(network, checkpoint.state, f"model.denoiser: {uri}", checkpoint.arch or type(network).__name__)
    return network.eval(), {"arch": checkpoint.arch, **checkpoint.metadata}
