"""The model registry: torchvision classifiers with published-checkpoint layouts, normalisation inside."""

from pathlib import Path

import pytest
import torch
import torchvision

import pipeline
from pipeline.certifiers import Cohen
from pipeline.config import load_config
from pipeline.models import ModelSpec, Normalize, load_model


def test_torchvision_model_loads_a_wrapped_checkpoint_and_certifies(tmp_path):
    reference = torchvision.models.get_model("resnet18", weights=None, num_classes=10).eval()
    # published smoothing checkpoints: {'arch': ..., 'state_dict': Sequential(normalize, DataParallel(model))}
    state = {f"1.module.{key}": value for key, value in reference.state_dict().items()}
    torch.save({"arch": "resnet18", "state_dict": state}, tmp_path / "checkpoint.pt")
    model = load_model(ModelSpec(name="resnet18", num_classes=10, weights=str(tmp_path / "checkpoint.pt")))
    assert isinstance(model[0], Normalize)
    images = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        expected = reference(Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(images))
        torch.testing.assert_close(model(images), expected)
    table = pipeline.certify(model, images, [1, 2], [Cohen(sigma=0.25, n0=10, n=50)], batch_size=32)
    assert table.num_rows == 2


def test_unreadable_or_mismatched_weights_name_the_file(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"cannot load model weights from .*broken\.pt"):
        load_model(ModelSpec(name="resnet18", weights=str(tmp_path / "broken.pt")))
    torch.save({"state_dict": {"fc.weight": torch.zeros(3, 3)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"model\.weights: .*other.pt does not fit resnet18"):
        load_model(ModelSpec(name="resnet18", weights=str(tmp_path / "other.pt")))


def test_imagenet_config_is_the_papers_setting():
    config = load_config(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "imagenet.yaml")
    assert [c.sigma for c in config.certifiers] == [0.25, 0.5, 1.0]
    assert {(c.n0, c.n, c.alpha) for c in config.certifiers} == {(100, 100_000, 0.001)}
    assert config.dataset.skip == 100 and config.dataset.transform.shape == (3, 224, 224)
    assert config.dataset.transform.resize == 256 and config.model.name == "resnet50"
