"""timm classifiers by name (`model.name: timm/<architecture>`), their weights in `.safetensors` or `.pt`, the
normalisation of timm's own `pretrained_cfg` inside the model."""

import hashlib
import json
import logging
import uuid

import boto3
import pytest
import torch

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

from pipeline.config import ConfigError, validate  # noqa: E402
from pipeline.distributed.certify import run  # noqa: E402
from pipeline.models import Normalize, load_model  # noqa: E402
from pipeline.storage import Storage  # noqa: E402


def _config(name: str, weights=None, **model) -> dict:
    entry = {"name": name, **model, **({"weights": str(weights)} if weights else {})}
    return {"run_id": "timm", "model": entry, "certifiers": [{"name": "cohen", "sigma": 0.25, "n0": 10, "n": 20}]}


def _timm_logits(reference, images: torch.Tensor) -> torch.Tensor:
    """timm's own preprocessing of [0, 1] pixels (its pretrained_cfg's mean and std), then its model."""
    cfg = reference.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"])[:, None, None], torch.tensor(cfg["std"])[:, None, None]
    with torch.inference_mode():
        return reference((images - mean) / std)


@pytest.mark.parametrize("arch, side", [("resnet18", 32), ("vit_tiny_patch16_224", 224)])
@pytest.mark.parametrize("save", ["safetensors", "pt"])
def test_timm_weights_load_by_name_and_give_timms_logits(tmp_path, arch, side, save):
    torch.manual_seed(0)
    reference = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    path = tmp_path / f"weights.{save}"
    if save == "safetensors":
        safetensors_torch.save_file(reference.state_dict(), path)
    else:
        torch.save(reference.state_dict(), path)
    # no num_classes given: read from the weights' classifier head
    model = load_model(validate(_config(f"timm/{arch}", path)).model)
    assert isinstance(model[0], Normalize)
    images = torch.rand(2, 3, side, side)
    with torch.inference_mode():
        logits = model(images)
    assert logits.shape == (2, 10)
    torch.testing.assert_close(logits, _timm_logits(reference, images), atol=1e-5, rtol=1e-5)


def test_timm_normalisation_comes_from_pretrained_cfg_and_can_be_overridden():
    spec = validate(_config("timm/vit_tiny_patch16_224")).model
    assert (spec.mean, spec.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # not ImageNet's: timm's own
    spec = validate(_config("timm/vit_tiny_patch16_224", mean=[0.4, 0.4, 0.4], std=[0.2, 0.2, 0.2])).model
    assert (spec.mean, spec.std) == ((0.4, 0.4, 0.4), (0.2, 0.2, 0.2))


def test_wrapped_timm_weights_and_mismatched_keys_are_named(tmp_path):
    reference = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    state = {f"module.{key}": value for key, value in reference.state_dict().items()}
    safetensors_torch.save_file(state, tmp_path / "wrapped.safetensors")
    model = load_model(validate(_config("timm/resnet18", tmp_path / "wrapped.safetensors")).model)
    assert model[1].fc.out_features == 10
    safetensors_torch.save_file({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"model\.weights: .*other\.safetensors does not fit timm/resnet18"):
        load_model(validate(_config("timm/resnet18", tmp_path / "other.safetensors")).model)
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"cannot load model weights from .*broken\.safetensors"):
        load_model(validate(_config("timm/resnet18", tmp_path / "broken.safetensors")).model)


def test_safetensors_weights_load_from_object_storage(tmp_path, s3_endpoint):
    reference = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    safetensors_torch.save_file(reference.state_dict(), tmp_path / "model.safetensors")
    bucket = f"timm-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    client.upload_file(str(tmp_path / "model.safetensors"), bucket, "resnet18/model.safetensors")
    spec = validate(_config("timm/resnet18", f"s3://{bucket}/resnet18/model.safetensors")).model
    model = load_model(spec, Storage(endpoint_url=s3_endpoint))
    images = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(images), _timm_logits(reference, images), atol=1e-5, rtol=1e-5)


def test_unknown_timm_name_says_how_to_list_the_names():
    with pytest.raises(ConfigError, match=r"model\.name: unknown timm architecture 'no_such_net'.*timm\.list_models"):
        validate(_config("timm/no_such_net"))
    with pytest.raises(ConfigError, match=r"model\.name: unknown model 'vit_tiny'.*timm/<architecture>"):
        validate(_config("vit_tiny"))


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ConfigError, match=r"model\.name: .*pip install 'pipeline\[timm\]'"):
        validate(_config("timm/resnet18"))


def test_a_ray_run_certifies_the_demo_digits_resized_to_a_timm_classifiers_input(ray_cluster, tmp_path, caplog):
    torch.manual_seed(0)
    reference = timm.create_model("test_vit.r160_in1k", pretrained=False, num_classes=10).eval()
    weights = tmp_path / "test_vit.safetensors"
    safetensors_torch.save_file(reference.state_dict(), weights)
    config = validate({"run_id": "timm-run", "output": str(tmp_path / "runs"), "seed": 0, "batch_size": 32,
                       "actors": {"count": 1, "cpus": 1}, "dataset": {"layout": "demo", "max": 3},
                       "model": {"name": "timm/test_vit.r160_in1k", "weights": str(weights)},
                       "certifiers": [{"name": "cohen", "sigma": 0.25, "n0": 10, "n": 30}]})
    with caplog.at_level(logging.INFO, logger="pipeline.run"):
        summary = run(config)
    assert "timm/test_vit.r160_in1k takes 3x160x160 inputs: the dataset's 3x32x32 crops are resized" in caplog.text
    rows = summary.results.to_pylist()
    assert len(rows) == 3 and all(row["status"] == "ok" for row in rows)
    expected = {"family": "timm", "name": "timm/test_vit.r160_in1k", "weights": str(weights),
                "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "num_classes": 10,
                "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "input_size": [3, 160, 160],
                "resized_from": [3, 32, 32]}
    assert all(json.loads(row["classifier"]) == expected for row in rows)
    manifest = json.loads((tmp_path / "runs" / "timm-run" / "manifest.json").read_text())
    assert manifest["classifier"] == expected and manifest["packages"]["timm"] == timm.__version__

    safetensors_torch.save_file({key: value + 1 for key, value in reference.state_dict().items()}, weights)
    with pytest.raises(ValueError, match=r"already exists with different model weights \(the file's SHA-256"):
        run(config)  # other weights at the same path: a resumed run would mix two classifiers
