"""CIFAR in its published forms (python batches, binary version), hub-style Parquet, and a certification run
over Ray on a CIFAR folder with the published ResNet-20 layout."""

import io
import json
import pickle
import uuid
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import pipeline
from pipeline import cli
from pipeline.certifiers import Cohen
from pipeline.config import ConfigError, load_config, read_yaml, validate
from pipeline.data.preprocess import decode, decode_batch
from pipeline.data.sources import DatasetError, DatasetSpec, list_images, read_encoded
from pipeline.models import load_model
from pipeline.storage import DEFAULT_STORAGE, Storage
from pipeline.train_classifier import ClassifierTraining, build

ROOT = Path(__file__).resolve().parents[1]

TEST_IMAGES, TRAIN_PER_BATCH = 7, 2


def cifar_arrays(count: int, seed: int, classes: int = 10) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, 3072), dtype=np.uint8), rng.integers(0, classes, count).tolist()


def python_batch(pixels: np.ndarray, labels: list[int], protocol: int, label_key: str = "labels") -> bytes:
    """A batch as the published files hold it: a dict of data, labels, filenames and the batch label."""
    batch = {"batch_label": "testing batch 1 of 1", label_key: labels, "data": pixels,
             "filenames": [f"image_{i}.png" for i in range(len(labels))]}
    return pickle.dumps(batch, protocol=protocol)


def binary_batch(pixels: np.ndarray, labels: list[int], coarse: list[int] | None = None) -> bytes:
    prefix = [np.array(labels, np.uint8)[:, None]] if coarse is None else [np.array(coarse, np.uint8)[:, None],
                                                                             np.array(labels, np.uint8)[:, None]]
    return np.concatenate([*prefix, pixels], axis=1).tobytes()


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """A CIFAR-10 root with both published versions of the same small splits (7 test images, 5 x 2 train),
    and a CIFAR-100 python folder; `arrays` holds what they contain."""
    root = tmp_path_factory.mktemp("cifar")
    python, binary = root / "cifar-10-batches-py", root / "cifar-10-batches-bin"
    python.mkdir()
    binary.mkdir()
    test = cifar_arrays(TEST_IMAGES, 0)
    (python / "test_batch").write_bytes(python_batch(*test, protocol=2))  # the protocol of the published files
    (binary / "test_batch.bin").write_bytes(binary_batch(*test))
    train = [cifar_arrays(TRAIN_PER_BATCH, seed) for seed in range(1, 6)]
    for number, batch in enumerate(train, 1):
        (python / f"data_batch_{number}").write_bytes(python_batch(*batch, protocol=4 + number % 2))
        (binary / f"data_batch_{number}.bin").write_bytes(binary_batch(*batch))
    hundred = root / "c100" / "cifar-100-python"
    hundred.mkdir(parents=True)
    fine = cifar_arrays(3, 9, classes=100)
    (hundred / "test").write_bytes(python_batch(*fine, protocol=2, label_key="fine_labels"))
    (root / "c100bin" / "cifar-100-binary").mkdir(parents=True)
    (root / "c100bin" / "cifar-100-binary" / "test.bin").write_bytes(binary_batch(*fine, coarse=[1, 2, 3]))
    arrays = {"test": test, "train": (np.concatenate([b[0] for b in train]), [label for b in train for label in b[1]]),
              "cifar100": fine}
    return root, arrays


def decoded(spec: DatasetSpec, storage: Storage = DEFAULT_STORAGE) -> tuple[np.ndarray, list[int], list[str]]:
    listing = list_images(spec, storage)
    pixels = np.stack([decode(data, spec.transform) for data in read_encoded(spec, listing, storage)])
    return pixels, listing["label"].to_pylist(), listing["image_id"].to_pylist()


def test_both_published_versions_give_the_images_labels_and_ids(cifar_root):
    root, arrays = cifar_root
    for split, count in (("test", TEST_IMAGES), ("train", 5 * TRAIN_PER_BATCH)):
        expected_pixels, expected_labels = arrays[split]
        for folder in (root, root / "cifar-10-batches-py", root / "cifar-10-batches-bin"):
            pixels, labels, ids = decoded(DatasetSpec(layout="cifar10", root=str(folder), split=split))
            assert pixels.shape == (count, 3, 32, 32)  # channel-major rows: red plane, green, blue
            np.testing.assert_array_equal(pixels, expected_pixels.reshape(-1, 3, 32, 32))
            assert labels == expected_labels and ids == [f"cifar10/{split}/{i}" for i in range(count)]
    pixels, labels, ids = decoded(DatasetSpec(layout="cifar10", root=str(root), skip=3))
    assert ids == ["cifar10/test/0", "cifar10/test/3", "cifar10/test/6"] and labels == arrays["test"][1][::3]
    for folder in ("c100", "c100bin"):  # CIFAR-100: the fine labels
        pixels, labels, ids = decoded(DatasetSpec(layout="cifar100", root=str(root / folder)))
        np.testing.assert_array_equal(pixels, arrays["cifar100"][0].reshape(-1, 3, 32, 32))
        assert labels == arrays["cifar100"][1] and ids == [f"cifar100/test/{i}" for i in range(3)]


def test_reads_cifar_from_object_storage(cifar_root, s3_endpoint):
    root, arrays = cifar_root
    bucket = f"cifar-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    client.upload_file(str(root / "cifar-10-batches-py" / "test_batch"), bucket, "data/cifar-10-batches-py/test_batch")
    pixels, labels, ids = decoded(DatasetSpec(layout="cifar10", root=f"s3://{bucket}/data"),
                                  Storage(endpoint_url=s3_endpoint))
    np.testing.assert_array_equal(pixels, arrays["test"][0].reshape(-1, 3, 32, 32))
    assert labels == arrays["test"][1] and ids[-1] == "cifar10/test/6"


class Marker:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.path}",)


class Evaluates:
    def __reduce__(self):
        return eval, ("1 + 1",)


def test_a_pickle_carrying_a_callable_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    for payload, refused in ((Marker(marker), r"(posix|os|nt)\.system"), (Evaluates(), r"builtins\.eval")):
        folder = tmp_path / uuid.uuid4().hex / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        pixels, labels = cifar_arrays(2, 0)
        (folder / "test_batch").write_bytes(pickle.dumps({"data": pixels, "labels": labels, "extra": payload}))
        with pytest.raises(DatasetError, match=rf"test_batch: refused to load {refused}: a CIFAR batch holds only"):
            list_images(DatasetSpec(layout="cifar10", root=str(folder)))
    assert not marker.exists()
    pickle.loads(pickle.dumps(Marker(marker)))  # the payload is real: plain pickle runs it
    assert marker.exists()


def test_truncated_or_malformed_batches_name_the_file(cifar_root, tmp_path):
    root, _ = cifar_root
    for folder, name in (("cifar-10-batches-py", "test_batch"), ("cifar-10-batches-bin", "test_batch.bin")):
        cut = tmp_path / folder
        cut.mkdir()
        data = (root / folder / name).read_bytes()
        (cut / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(DatasetError, match=rf"{cut / name}.* truncated"):
            list_images(DatasetSpec(layout="cifar10", root=str(cut)))
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}))
    with pytest.raises(DatasetError, match=r"odd/test_batch: 'data' must be a uint8 array \[N, 3072\]"):
        list_images(DatasetSpec(layout="cifar10", root=str(odd)))
    (odd / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}))
    with pytest.raises(DatasetError, match=r"labels must lie in 0\.\.9"):
        list_images(DatasetSpec(layout="cifar10", root=str(odd)))
    with pytest.raises(DatasetError, match=r"holds no cifar10 train split: expected cifar-10-batches-py/data_batch_1"):
        list_images(DatasetSpec(layout="cifar10", root=str(odd), split="train"))
    with pytest.raises(ConfigError, match=r"dataset\.split: cifar10 has the splits \['train', 'test'\]"):
        validate({"certifiers": [{"name": "cohen", "sigma": 0.25}],
                  "dataset": {"layout": "cifar10", "root": str(odd), "split": "val"}})


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.reshape(3, 32, 32).transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_hub_parquet_lists_labels_reads_bytes_and_keeps_bad_images_as_errors(tmp_path):
    pixels, labels = cifar_arrays(5, 3)
    images = [{"bytes": png(p), "path": None} for p in pixels]
    images[3] = {"bytes": b"not an image", "path": None}
    table = pa.table({"img": images, "label": labels})
    (tmp_path / "plain_text").mkdir()
    pq.write_table(table.slice(0, 2), tmp_path / "plain_text" / "test-00000-of-00002.parquet", row_group_size=1)
    pq.write_table(table.slice(2), tmp_path / "plain_text" / "test-00001-of-00002.parquet", row_group_size=2)
    pq.write_table(table.slice(0, 1), tmp_path / "plain_text" / "train-00000-of-00001.parquet")
    spec = DatasetSpec(layout="hf_parquet", root=str(tmp_path / "plain_text"), size=32, skip=1)
    listing = list_images(spec)
    assert listing["image_id"].to_pylist() == [f"test/{i}" for i in range(5)]
    assert listing["label"].to_pylist() == labels
    batch = decode_batch({key: np.array(listing[key].to_pylist(), dtype=object) for key in listing.column_names},
                         spec.transform)
    assert [bool(error) for error in batch["error"]] == [False, False, False, True, False]
    assert "test/3: cannot identify an image" in batch["error"][3]
    np.testing.assert_array_equal(batch["pixels"][4], pixels[4].reshape(3, 32, 32))
    named = pa.table({"image": [{"bytes": png(p), "path": f"ILSVRC2012_val_{i:08d}.JPEG"}
                                for i, p in enumerate(pixels[:2], 1)], "label": [7, 8]})
    pq.write_table(named, tmp_path / "validation.parquet")
    listing = list_images(DatasetSpec(layout="hf_parquet", root=str(tmp_path / "validation.parquet"), size=32,
                                      split="validation", skip=2))
    assert listing["image_id"].to_pylist() == ["ILSVRC2012_val_00000001.JPEG"] and listing["label"].to_pylist() == [7]
    with pytest.raises(DatasetError, match=r"dataset\.label_column: .* has no column 'fine_label'"):
        list_images(DatasetSpec(layout="hf_parquet", root=str(tmp_path / "validation.parquet"), size=32,
                                label_column="fine_label"))


def test_certifies_a_cifar_folder_over_ray_with_the_published_resnet20(ray_cluster, cifar_root, reference, tmp_path):
    from pipeline.distributed.certify import run
    from pipeline.results import read_results
    from pipeline.storage import open_location

    root, arrays = cifar_root
    weights = str(reference / "checkpoints" / "cohen_cifar_resnet20.pth.tar")
    certifiers = [{"name": "cohen", "sigma": 0.25, "n0": 20, "n": 100, "alpha": 0.001}]
    config = validate({"run_id": "cifar", "output": str(tmp_path), "images_per_batch": 4, "batch_size": 128,
                       "actors": {"count": 1, "cpus": 1}, "certifiers": certifiers, "model": {"weights": weights},
                       "dataset": {"layout": "cifar10", "root": str(root / "cifar-10-batches-bin"), "skip": 2}})
    uri = run(config).uri
    rows = sorted(read_results(open_location(uri).join("results")).to_pylist(), key=lambda row: row["image_index"])
    assert [row["image_id"] for row in rows] == [f"cifar10/test/{i}" for i in range(0, TEST_IMAGES, 2)]
    assert [row["label"] for row in rows] == arrays["test"][1][::2]
    assert all(row["status"] == "ok" and row["model"] == weights for row in rows)
    images = torch.from_numpy(arrays["test"][0][::2].reshape(-1, 3, 32, 32)).float() / 255
    local = pipeline.certify(load_model(config.model), images, arrays["test"][1][::2],
                             [Cohen(sigma=0.25, n0=20, n=100)], image_ids=[row["image_id"] for row in rows])
    keys = ("image_id", "prediction", "radius", "count", "correct")
    assert [{k: row[k] for k in keys} for row in rows] == [{k: row[k] for k in keys} for row in local.to_pylist()]


def test_trains_a_noise_trained_cifar_classifier_that_loads_as_published(cifar_root, tmp_path):
    root, arrays = cifar_root
    output = tmp_path / "mine"
    assert cli.main(["train-classifier", "--config", str(ROOT / "jobs" / "configs" / "train_cifar10.yaml"),
                     "--output", str(output), "--set", "arch=cifar_resnet20", "--set", f"dataset.root={root}",
                     "--set", f"test.root={root}", "--set", "test.skip=1", "--set",
                     "noise=[gaussian:0.25, dssn:0.5]", "--set", "epochs=1", "--set", "batch_size=4"]) == 0
    checkpoint = torch.load(output / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["arch"] == "cifar_resnet20" and checkpoint["epoch"] == 1
    assert checkpoint["noise"] == ["gaussian:0.25", "dssn:0.5"]
    assert all(key.startswith("1.") for key in checkpoint["state_dict"])  # Sequential(normalize, model), as Cohen's
    history = json.loads((output / "training.json").read_text())["epochs"]
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])
    assert set(history[0]) >= {"test_accuracy[gaussian:0.25]", "test_accuracy[dssn:0.5]"}
    model = load_model(validate({"certifiers": [{"name": "cohen", "sigma": 0.25}],
                                 "model": {"weights": str(output / "checkpoint.pth.tar")}}).model)
    torch.manual_seed(0)  # the seed's initial weights: training moved them
    initial = build(ClassifierTraining.from_dict({"arch": "cifar_resnet20", "dataset": {"layout": "demo"}}))
    assert not torch.equal(model[1].conv1.weight, initial[1].conv1.weight)
    images = torch.from_numpy(arrays["test"][0].reshape(-1, 3, 32, 32)).float() / 255
    with torch.inference_mode():
        assert torch.isfinite(model(images)).all()


def test_training_configs_name_the_bad_key():
    base = {"arch": "cifar_resnet20", "dataset": {"layout": "demo"}}
    for key, value, message in [("noise", ["gauss:0.25"], "noise 'gauss:0.25': give 'none' or KIND:SIGMA"),
                                ("noise", ["gaussian:-1"], "SIGMA > 0"), ("arch", "dncnn", "dncnn is a denoiser"),
                                ("arch", "resnet9000", "unknown architecture 'resnet9000'"),
                                ("lr", 0, "lr must be a number > 0"), ("colour", 1, "unknown classifier training key")]:
        with pytest.raises(ConfigError, match=message):
            ClassifierTraining.from_dict({**base, key: value})


def test_cifar10_configs_are_the_papers_settings():
    configs = ROOT / "jobs" / "configs"
    paths = ["dataset.root=s3://bucket/cifar10", "model.weights=models/cifar10/resnet110/noise_0.50/checkpoint.pth.tar"]
    cohen = load_config(configs / "cifar10.yaml", paths)
    assert [c.sigma for c in cohen.certifiers] == [0.12, 0.25, 0.5, 1.0]
    assert {(c.name, c.n0, c.n, c.alpha) for c in cohen.certifiers} == {("cohen", 100, 100_000, 0.001)}
    assert (cohen.dataset.layout, cohen.dataset.split, cohen.dataset.skip) == ("cifar10", "test", 20)
    assert cohen.dataset.transform.shape == (3, 32, 32) and cohen.model.name == "cifar_resnet110"
    assert cohen.dataset.root == "s3://bucket/cifar10" and cohen.model.mean == (0.4914, 0.4822, 0.4465)
    salman = load_config(configs / "cifar10_denoised.yaml", paths[:1])
    assert {(c.n0, c.n, c.alpha) for c in salman.certifiers} == {(100, 10_000, 0.001)}
    assert salman.model.name is None and salman.model.weights.endswith("noise_0.00/checkpoint.pth.tar")
    assert "dncnn" in salman.model.denoiser and salman.dataset.skip == 20
    dssn = load_config(configs / "cifar10_dssn.yaml", paths[:1])
    assert [(c.name, c.sigma, c.q) for c in dssn.certifiers] == [("dssn", 0.5, 255), ("dssn", 3.5, 255)]
    assert dssn.dataset.skip == 1 and dssn.model.name == "cifar_wrn40_10"
    training = ClassifierTraining.from_dict(read_yaml(configs / "train_cifar10.yaml"))
    assert (training.arch, training.epochs, training.lr, training.noise) == ("cifar_resnet110", 90, 0.1,
                                                                              ("gaussian:0.25",))
