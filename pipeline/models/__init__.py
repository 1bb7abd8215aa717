"""Model registry: the classifiers of four families (`FAMILIES`: the project's, torchvision's, timm's and
Hugging Face folders) and the denoisers (`pipeline.models.architectures`, `pipeline.models.huggingface`),
each with its normalisation first inside the model, and, where the classifier was trained on another input
size than the dataset's crop, a resize in front of it (`pipeline.models.inputs`): noise and radii stay in
the dataset's pixel space.

Weights load from a path or URI the user gives, `.safetensors` with safetensors and any other file always
with `torch.load(weights_only=True)` (`pipeline.models.checkpoints`): a plain state dict, or a published
`{'arch', 'state_dict', ...}` checkpoint, with the `1.`, `module.` and `1.module.` prefixes of
Sequential(normalize, model) and DataParallel wrappers removed. `model: {weights: PATH}` alone builds the
checkpoint's `arch`; with a `name` as well, the two must agree.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from typing import Annotated

import pyarrow.fs as pafs
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from pipeline.families import FAMILIES
from pipeline.models.architectures import (
    CLASSIFIER,
    DENOISER,
    TIMM_PREFIX,
    Architecture,
    architecture,
    classifier_names,
    infer_denoiser,
    is_classifier_name,
)
from pipeline.models.checkpoints import (
    Checkpoint,
    build_to_load,
    files_sha256,
    fit_state,
    read_checkpoint,
    strip_wrappers,
)
from pipeline.models.demo import WEIGHTS, DemoCNN, load_demo_model
from pipeline.models.denoisers import Denoised, classifier_digest, load_denoiser
from pipeline.models.diffusion import read_diffusion
from pipeline.models.huggingface import HF_NAME, is_hf_folder, read_folder
from pipeline.models.inputs import Normalize, Resize
from pipeline.sections import Count, Listed, Number, Section
from pipeline.storage import DEFAULT_STORAGE, Storage

log = logging.getLogger(__name__)

__all__ = ["FAMILIES", "DemoCNN", "LoadedModel", "ModelSpec", "Normalize", "Resize", "WithFeatures",
           "load_any_denoiser", "load_demo_model", "load_model", "load_state_dict", "model_names", "open_model"]


class ModelSpec(Section):
    """A model entry of a config: a classifier `name` of one of the `FAMILIES` (none with `weights`: the
    checkpoint's `arch`, or the Hugging Face folder's config; neither: the demo CNN), `weights` (a file or a
    `save_pretrained` folder, a path or URI; none: the demo's shipped weights, or a random network), the
    normalisation put in front (`mean`, `std`; default: the architecture's, CIFAR-10's or ImageNet's, timm's
    `pretrained_cfg`, the Hugging Face image processor's), the `input_size` the classifier takes (the side of
    its square input; default: timm's `pretrained_cfg`, the image processor's; none for the others), where
    a dataset crop of another size is resized to, `num_classes` (default: the architecture's; for `timm/`
    names, the rows of the weights' classifier head, else timm's default; a Hugging Face folder's labels;
    the demo CNN's shipped weights have 10, and another count is refused), and a `denoiser` in front of the
    classifier (a project artifact or a published denoiser checkpoint). A spec that exists is valid (its
    weights are read when the model is loaded: without a name, their `arch` names the architecture)."""

    name: str | None = None
    weights: Annotated[str, Field(min_length=1)] | None = None
    mean: Annotated[tuple[Number, ...], Listed] | None = None
    std: Annotated[tuple[Number, ...], Listed] | None = None
    num_classes: Count | None = Field(None, ge=1)
    input_size: Count | None = Field(None, ge=1)
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
        elif name is not None and name != HF_NAME and not is_classifier_name(name):
            raise ValueError(f"{{where}}: unknown model {name!r}; the classifier families: " + "; ".join(FAMILIES))
        return name

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.name == HF_NAME and self.weights is None:
            raise ValueError("{where}.weights: a huggingface classifier needs its save_pretrained folder (the "
                             "one holding config.json), a path or s3:// URI")
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


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode (the classifier, with any resize and normalisation in front of it and any
    denoiser before those) and the record of the classifier that ran (`record()`)."""

    model: nn.Module
    family: str
    name: str
    weights: str | None
    weight_files: tuple[str, ...]
    num_classes: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    input_size: tuple[int, ...] | None
    resized_from: tuple[int, ...] | None
    storage: Storage  # where the weights files are read from (and hashed)
    denoiser: nn.Module | None = None
    denoiser_weights: str | None = None
    denoiser_files: tuple[str, ...] = ()
    denoiser_arch: str | None = None

    def record(self) -> dict:
        """What rows and manifests say of the classifier: family, name, weights (as the config gave them)
        and the SHA-256 of the weights file (what `sha256sum` prints; `files_sha256` for a sharded folder),
        class count, normalisation, the (C, H, W) input it takes and the dataset's, where resized from."""
        return {"family": self.family, "name": self.name, "weights": self.weights,
                "weights_sha256": files_sha256(self.weight_files, self.storage) if self.weight_files else None,
                "num_classes": self.num_classes, "mean": _listed(self.mean), "std": _listed(self.std),
                "input_size": _listed(self.input_size), "resized_from": _listed(self.resized_from)}


    @functools.cached_property
    def _denoiser_sha256(self) -> str | None:
        return files_sha256(self.denoiser_files, self.storage) if self.denoiser_files else None

    def denoiser_record(self, sigma: float) -> dict | None:
        """What rows of noise level `sigma` say of the denoiser (None without one): its weights as given and
        their SHA-256, its architecture and, for a diffusion denoiser, the timestep t* it denoises `sigma` at
        and abar at t* (`OneShotDenoiser.timestep`)."""
        if self.denoiser is None:
            return None
        record = {"weights": self.denoiser_weights, "weights_sha256": self._denoiser_sha256,
                  "architecture": self.denoiser_arch}
        describe, timestep = getattr(self.denoiser, "describe", None), getattr(self.denoiser, "timestep", None)
        if describe is not None:
            record["architecture"] = describe()
        if timestep is not None:
            record["t_star"], record["alpha_bar"] = timestep(float(sigma))
        return record


def _listed(values: tuple | None) -> list | None:
    return list(values) if values is not None else None


def load_model(spec: ModelSpec, storage: Storage = DEFAULT_STORAGE,
               input_shape: tuple[int, int, int] | None = None) -> nn.Module:
    """The classifier a model spec names, in eval mode, for inputs of `input_shape` (C, H, W; resized in
    front of the classifier where it takes another size); with a `denoiser`, the composition
    classifier(denoiser(x))."""
    return open_model(spec, storage, input_shape).model


def open_model(spec: ModelSpec, storage: Storage = DEFAULT_STORAGE,
               input_shape: tuple[int, int, int] | None = None) -> LoadedModel:
    """`load_model`, with what the classifier is (`LoadedModel`)."""
    loaded = _load_classifier(spec, storage, input_shape)
    if not spec.denoiser:
        return loaded
    denoiser, metadata = load_any_denoiser(spec.denoiser, storage)
    trained_for = metadata.get("classifier")
    if trained_for is not None and trained_for.get("sha256") != classifier_digest(loaded.model):
        log.warning("denoiser %s was trained for another classifier (%s); certifying it in front of %s",
                    spec.denoiser, trained_for.get("spec"), spec.name or spec.weights)
    location = storage.open(spec.denoiser)  # a checkpoint file, or an artifact folder holding denoiser.pt
    files = (spec.denoiser if location.fs.get_file_info(location.path).type == pafs.FileType.File
             else location.join("denoiser.pt").uri,)
    architecture = metadata.get("arch") or (metadata.get("architecture") or {}).get("name") or \
        type(denoiser).__name__
    return replace(loaded, model=Denoised(loaded.model, denoiser).eval(), denoiser=denoiser,
                   denoiser_weights=spec.denoiser, denoiser_files=files, denoiser_arch=architecture)


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


def _source(spec: ModelSpec, storage: Storage) -> tuple[Architecture, Checkpoint | None, tuple[str, ...]]:
    """(the architecture, its checkpoint or None, the weights files read): a Hugging Face folder (named
    `huggingface`, or found holding config.json), else the checkpoint file and `model.name` / its `arch`."""
    if spec.weights and (spec.name == HF_NAME or (spec.name is None and is_hf_folder(spec.weights, storage))):
        folder = read_folder(spec.weights, storage)
        return folder.architecture(), None, folder.weights  # its build reads the weights
    checkpoint = read_checkpoint(spec.weights, storage) if spec.weights else None
    return _resolve(spec, checkpoint), checkpoint, (spec.weights,) if spec.weights else ()


def _load_classifier(spec: ModelSpec, storage: Storage, input_shape: tuple[int, int, int] | None) -> LoadedModel:
    if spec.weights is None and spec.name == "demo_cnn":
        return LoadedModel(load_demo_model(WEIGHTS), "project", "demo_cnn", None, (str(WEIGHTS),), 10, None, None,
                           input_shape, None, storage)
    arch, checkpoint, files = _source(spec, storage)
    num_classes = spec.num_classes if spec.num_classes is not None else _default_classes(arch, checkpoint)
    if checkpoint is not None:
        network = build_to_load(lambda: arch.build(int(num_classes)))
        fit_state(network, checkpoint.state, f"model.weights: {spec.weights}", arch.name)
    else:
        network = arch.build(int(num_classes))
        if not files:
            log.warning("model %s has no weights: certifying a randomly initialised network", arch.name)
    mean = spec.mean if spec.mean is not None else arch.mean
    std = spec.std if spec.std is not None else arch.std
    size = (spec.input_size, spec.input_size) if spec.input_size else arch.input_size[1:] if arch.input_size else None
    resized = input_shape is not None and size is not None and tuple(size) != tuple(input_shape[1:])
    layers = [Resize(size)] if resized else []
    layers += [Normalize(mean, std)] if mean is not None else []
    model = nn.Sequential(*layers, network).eval() if layers else network.eval()
    seen = (input_shape[0], *size) if resized else input_shape
    return LoadedModel(model, arch.family, arch.name, spec.weights, files, int(num_classes), mean, std, seen,
                       tuple(input_shape) if resized else None, storage)


def _default_classes(arch: Architecture, checkpoint: Checkpoint | None) -> int:
    """The class count of an architecture's default, else of its weights' head, else of its library's."""
    if arch.num_classes is not None:
        return arch.num_classes
    found = arch.classes_in(strip_wrappers(checkpoint.state, {f"{arch.head}.weight"})[0]) if checkpoint else None
    return found if found is not None else arch.fallback_classes


def load_any_denoiser(uri: str, storage: Storage = DEFAULT_STORAGE) -> tuple[nn.Module, dict]:
    """(denoiser in eval mode, what is known of it): a project artifact (a directory or prefix with
    artifact.json, `pipeline.models.denoisers`) or a published denoiser checkpoint (a file: Salman et al.'s
    {'arch', 'state_dict'}, a plain DnCNN / MemNet state dict, sized by its shapes, or a published diffusion
    model's, guided-diffusion's or improved-diffusion's UNet, as the noise-conditioned one-shot denoiser of
    `pipeline.models.diffusion`)."""
    location = storage.open(uri)
    try:
        is_file = location.fs.get_file_info(location.path).type == pafs.FileType.File
    except OSError as error:
        raise ValueError(f"model.denoiser: cannot reach {uri}: {error}") from error
    if not is_file:
        return load_denoiser(uri, storage)
    checkpoint = read_checkpoint(uri, storage)
    if checkpoint.arch is None:
        try:
            diffusion = read_diffusion(checkpoint.state)
        except ValueError as error:
            raise ValueError(f"model.denoiser: {uri}: {error}") from error
        if diffusion is not None:
            return diffusion, {"arch": diffusion.describe()["architecture"], **checkpoint.metadata}
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
