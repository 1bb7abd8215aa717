"""Hugging Face image classifiers from their `save_pretrained` folders (`model.name: huggingface`), local and
s3://, give transformers' own logits on pixels its own image processor prepared; a crop of another size is
resized in front of the classifier, inside the model."""

import hashlib
import uuid

import boto3
import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from pipeline.config import ConfigError, validate  # noqa: E402
from pipeline.models import Normalize, Resize, open_model  # noqa: E402
from pipeline.storage import Storage  # noqa: E402

SIDE = 32


def _config(**model) -> dict:
    return {"run_id": "hf", "model": model, "certifiers": [{"name": "cohen", "sigma": 0.25, "n0": 10, "n": 20}]}


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """(folder, model, processor): a small random ViT and its image processor, saved by transformers."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=SIDE, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=10)
    model = transformers.ViTForImageClassification(config).eval()
    processor = transformers.ViTImageProcessor(size={"height": SIDE, "width": SIDE}, image_mean=[0.4, 0.5, 0.6],
                                               image_std=[0.2, 0.25, 0.3])
    folder = tmp_path_factory.mktemp("vit")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


def _images(count: int, side: int = SIDE) -> np.ndarray:
    return (np.random.default_rng(1).random((count, side, side, 3)) * 255).astype(np.uint8)


def _pixels(images: np.ndarray) -> torch.Tensor:
    """Decoded 8-bit images as the project hands them to a model: [N, C, H, W] in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def _own_logits(model, processor, images: np.ndarray) -> torch.Tensor:
    inputs = processor(images=[Image.fromarray(image) for image in images], return_tensors="pt")
    with torch.inference_mode():
        return model(**inputs).logits


@pytest.mark.parametrize("named", [True, False])
def test_a_save_pretrained_folder_gives_transformers_logits(vit, named):
    folder, model, processor = vit
    entry = {"name": "huggingface", "weights": str(folder)} if named else {"weights": str(folder)}
    loaded = open_model(validate(_config(**entry)).model, input_shape=(3, SIDE, SIDE))
    assert isinstance(loaded.model[0], Normalize)  # the processor's normalisation, inside the model
    images = _images(3)
    with torch.inference_mode():
        logits = loaded.model(_pixels(images))
    torch.testing.assert_close(logits, _own_logits(model, processor, images), atol=1e-5, rtol=1e-5)
    record = loaded.record()
    assert record == {"family": "huggingface", "name": "huggingface/ViTForImageClassification",
                      "weights": str(folder),
                      "weights_sha256": hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest(),
                      "num_classes": 10, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3],
                      "input_size": [3, SIDE, SIDE], "resized_from": None}


def test_a_pytorch_model_bin_folder_loads_without_pickle(vit, tmp_path):
    folder, model, processor = vit
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), tmp_path / "pytorch_model.bin")  # the saved keys
    loaded = open_model(validate(_config(name="huggingface", weights=str(tmp_path))).model)
    images = _images(2)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(_pixels(images)), _own_logits(model, processor, images),
                                   atol=1e-5, rtol=1e-5)


def test_a_folder_in_object_storage_loads(vit, s3_endpoint):
    folder, model, processor = vit
    bucket = f"hf-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    for path in folder.iterdir():
        client.upload_file(str(path), bucket, f"vit/{path.name}")
    spec = validate(_config(name="huggingface", weights=f"s3://{bucket}/vit")).model
    loaded = open_model(spec, Storage(endpoint_url=s3_endpoint))
    images = _images(2)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(_pixels(images)), _own_logits(model, processor, images),
                                   atol=1e-5, rtol=1e-5)


def test_a_smaller_crop_is_resized_in_front_of_the_classifier(vit):
    folder, model, _ = vit
    loaded = open_model(validate(_config(weights=str(folder))).model, input_shape=(3, 24, 24))
    assert isinstance(loaded.model[0], Resize) and loaded.model[0].size == (SIDE, SIDE)
    assert loaded.record()["input_size"] == [3, SIDE, SIDE] and loaded.record()["resized_from"] == [3, 24, 24]
    pixels = _pixels(_images(2, 24))
    resized = torch.nn.functional.interpolate(pixels, size=(SIDE, SIDE), mode="bicubic", antialias=True)
    mean, std = torch.tensor([0.4, 0.5, 0.6])[:, None, None], torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(pixels), model(pixel_values=(resized - mean) / std).logits,
                                   atol=1e-5, rtol=1e-5)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert loaded.model(pixels.bfloat16()).shape == (2, 10)  # bf16 inputs, as precision bf16 hands them
    same = open_model(validate(_config(weights=str(folder), input_size=24)).model, input_shape=(3, 24, 24))
    assert not isinstance(same.model[0], Resize)  # model.input_size overrides the processor's


def test_what_is_wrong_with_a_folder_is_named(vit, tmp_path):
    folder, _, _ = vit
    with pytest.raises(ConfigError, match=r"model\.weights: a huggingface classifier needs its save_pretrained"):
        validate(_config(name="huggingface"))
    with pytest.raises(ValueError, match=r"is not a Hugging Face save_pretrained folder \(no config\.json\)"):
        open_model(validate(_config(name="huggingface", weights=str(tmp_path))).model)
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    with pytest.raises(ValueError, match=r"holds no weights: none of model\.safetensors, pytorch_model\.bin"):
        open_model(validate(_config(name="huggingface", weights=str(tmp_path))).model)
    torch.save({"vit.embeddings.cls_token": torch.zeros(1, 1, 32)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"does not fit its config's ViTForImageClassification: missing keys"):
        open_model(validate(_config(name="huggingface", weights=str(tmp_path))).model)
    with pytest.raises(ValueError, match=r"model\.num_classes is 5, but .* has 10 labels"):
        open_model(validate(_config(weights=str(folder), num_classes=5)).model)


def test_an_unknown_name_lists_the_families():
    with pytest.raises(ConfigError) as raised:
        validate(_config(name="vit_tiny"))
    message = str(raised.value)
    assert "unknown model 'vit_tiny'" in message
    for family in ("demo_cnn", "torchvision.models.list_models()", "timm/<architecture>", "timm.list_models",
                   "huggingface with model.weights a save_pretrained folder"):
        assert family in message


def test_missing_transformers_names_the_extra(vit, monkeypatch):
    folder, _, _ = vit
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'pipeline\[huggingface\]'"):
        open_model(validate(_config(name="huggingface", weights=str(folder))).model)
