"""Published checkpoints: the reference files reproduce their authors' outputs through the config path, every
published layout loads into the architecture of its name, and what does not fit is named."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torchvision

from pipeline.config import validate
from pipeline.models import ModelSpec, Normalize, load_any_denoiser, load_model
from pipeline.models.architectures import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, architecture
from pipeline.models.memnet import MemNet

RTOL = 1e-4
LAYOUT_ARCH = {  # layouts.json entry -> the `arch` its checkpoints carry
    "cohen cifar_resnet110": "cifar_resnet110", "cohen imagenet resnet50": "resnet50",
    "salman cifar_dncnn_wide": "cifar_dncnn_wide", "salman imagenet_dncnn": "imagenet_dncnn",
    "salman memnet": "memnet", "salman cifar_wrn ": "cifar_wrn", "salman cifar_wrn40": "cifar_wrn40"}


@pytest.fixture(scope="module")
def published(reference):
    folder = reference / "checkpoints"
    outputs = np.load(folder / "outputs.npz")
    return {"resnet20": str(folder / "cohen_cifar_resnet20.pth.tar"),
            "dncnn": str(folder / "salman_cifar_dncnn.pth.tar"),
            "layouts": json.loads((folder / "layouts.json").read_text()),
            **{key: torch.from_numpy(outputs[key]) for key in outputs.files}}


def configured(model: dict):
    config = validate({"certifiers": [{"name": "cohen", "sigma": 0.25}], "model": model})
    return load_model(config.model)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * float(expected.abs().max()))


def test_the_reference_checkpoints_reproduce_their_outputs_alone_and_composed(published):
    inputs = published["inputs"]
    classifier = configured({"weights": published["resnet20"]})  # the architecture and normalisation from 'arch'
    assert not classifier.training and isinstance(classifier[0], Normalize)
    torch.testing.assert_close(classifier[0].mean.flatten(), torch.tensor(CIFAR10_MEAN))
    torch.testing.assert_close(classifier[0].std.flatten(), torch.tensor(CIFAR10_STD))
    composed = configured({"name": "cifar_resnet20", "weights": published["resnet20"], "denoiser": published["dncnn"]})
    assert not composed.training and not composed.denoiser.training
    with torch.inference_mode():
        close(classifier(inputs), published["cohen_cifar_resnet20_logits"])
        close(composed.denoiser(inputs), published["salman_cifar_dncnn_outputs"])
        close(composed(inputs), published["dncnn_then_resnet20_logits"])


def test_the_legacy_serialisation_of_older_checkpoints_loads_the_same(published, tmp_path):
    checkpoint = torch.load(published["resnet20"], weights_only=True)
    torch.save(checkpoint, tmp_path / "legacy.pth.tar", _use_new_zipfile_serialization=False)  # PyTorch < 1.6
    with torch.inference_mode():
        close(configured({"weights": str(tmp_path / "legacy.pth.tar")})(published["inputs"]),
              published["cohen_cifar_resnet20_logits"])


def test_a_name_that_disagrees_with_the_checkpoint_or_a_misplaced_network_is_refused(published):
    with pytest.raises(ValueError, match=r"model\.name is 'cifar_resnet110', but .* holds a 'cifar_resnet20' "):
        configured({"name": "cifar_resnet110", "weights": published["resnet20"]})
    with pytest.raises(ValueError, match=r"dncnn is a denoiser; give it as model\.denoiser"):
        configured({"weights": published["dncnn"]})
    with pytest.raises(ValueError, match=r"holds a 'cifar_resnet20' classifier, not a denoiser"):
        configured({"weights": published["resnet20"], "denoiser": published["resnet20"]})


def test_keys_that_do_not_fit_are_named(published, tmp_path):
    checkpoint = torch.load(published["resnet20"], weights_only=True)
    state = checkpoint["state_dict"]
    del state["1.layer2.0.downsample.0.weight"]
    state["1.fc.extra"] = torch.zeros(1)
    state["1.fc.weight"] = torch.zeros(100, 64)
    torch.save(checkpoint, tmp_path / "broken.pth.tar")
    with pytest.raises(ValueError) as caught:
        configured({"weights": str(tmp_path / "broken.pth.tar")})
    message = str(caught.value)
    assert "broken.pth.tar does not fit cifar_resnet20 (keys read after removing the prefix '1.')" in message
    assert "missing keys layer2.0.downsample.0.weight; unexpected keys fc.extra;" in message
    assert "mis-shaped keys fc.weight [100, 64] (the network's: [10, 64])" in message
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"plain\.pt is a plain state dict with no 'arch'; name its architecture"):
        configured({"weights": str(tmp_path / "plain.pt")})
    torch.save({**checkpoint, "extra": os.system}, tmp_path / "code.pth.tar")  # weights_only refuses any callable
    with pytest.raises(ValueError, match=r"cannot load model weights from .*code\.pth\.tar"):
        configured({"weights": str(tmp_path / "code.pth.tar")})


def random_state(layout: dict[str, list[int]], pool: torch.Tensor) -> dict[str, torch.Tensor]:
    """A state dict of the layout's keys and shapes, each tensor a copy of the next stretch of a random pool
    (cheaper than drawing every tensor afresh, and no two tensors alike)."""
    state, offset = {}, 0
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7, dtype=torch.int64)
            continue
        count = math.prod(shape)
        offset = offset if offset + count <= len(pool) else 0
        state[key] = pool[offset:offset + count].view(shape).clone()
        offset += count + 1
    return state


def test_every_published_layout_loads_into_the_architecture_of_its_name(published, tmp_path):
    largest = max(sum(math.prod(shape) for shape in layout.values()) for layout in published["layouts"].values())
    pool = torch.rand(largest + len(max(published["layouts"].values(), key=len)),
                      generator=torch.Generator().manual_seed(0))
    assert len(published["layouts"]) == len(LAYOUT_ARCH)
    for entry, layout in published["layouts"].items():
        arch = next(arch for prefix, arch in LAYOUT_ARCH.items() if entry.startswith(prefix))
        state = random_state(layout, pool)
        path = tmp_path / f"{arch}.pth.tar"
        torch.save({"epoch": 90, "arch": arch, "state_dict": state}, path)  # as the training scripts save them
        del layout
        if architecture(arch).kind == "denoiser":
            network, metadata = load_any_denoiser(str(path))
            assert metadata == {"arch": arch, "epoch": 90}
        else:
            model = load_model(ModelSpec(weights=str(path)))
            network = model[1]
            expected_mean = CIFAR10_MEAN if arch.startswith("cifar") else IMAGENET_MEAN
            torch.testing.assert_close(model[0].mean.flatten(), torch.tensor(expected_mean))
        prefix = next(p for p in ("1.module.", "1.", "module.", "") if all(key.startswith(p) for key in state))
        loaded = network.state_dict()
        assert set(loaded) == {key[len(prefix):] for key in state}, entry
        assert all(torch.equal(loaded[key[len(prefix):]], value) for key, value in state.items()), entry
        del network, state, loaded
        path.unlink()


def test_plain_state_dicts_of_torchvision_and_off_the_shelf_denoisers(published, tmp_path):
    reference = torchvision.models.get_model("resnet18", weights=None, num_classes=10).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = configured({"name": "resnet18", "num_classes": 10, "weights": str(tmp_path / "resnet18.pth")})
    assert all(torch.equal(model[1].state_dict()[key], value) for key, value in reference.state_dict().items())
    dncnn = torch.load(published["dncnn"], weights_only=True)["state_dict"]
    torch.save({f"module.{key}": value for key, value in dncnn.items()}, tmp_path / "dncnn_plain.pth")
    denoiser, _ = load_any_denoiser(str(tmp_path / "dncnn_plain.pth"))  # sized from its shapes: depth 17, 64 channels
    with torch.inference_mode():
        close(denoiser(published["inputs"]), published["salman_cifar_dncnn_outputs"])
    small = MemNet(3, 8, memory_blocks=2, residual_blocks=3).eval()
    torch.save(small.state_dict(), tmp_path / "memnet_plain.pth")
    memnet, _ = load_any_denoiser(str(tmp_path / "memnet_plain.pth"))
    assert isinstance(memnet, MemNet) and len(memnet.dense_memory) == 2
    assert len(memnet.dense_memory[0].recursive_unit) == 3
    x = torch.rand(2, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(memnet(x), small(x))
