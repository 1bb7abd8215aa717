"""The public API: pipeline.certify on the demo model, its schema, its reproducibility, its errors."""

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from conftest import without_batch
from torch import nn

import pipeline
from pipeline import results
from pipeline.certifiers import Cohen, TopK
from pipeline.data.demo import load_demo
from pipeline.models import load_demo_model

CERTIFIERS = [Cohen(sigma=0.25, n0=50, n=300, alpha=0.001), TopK(k=3, sigma=0.25, n=300, alpha=0.001)]


@pytest.fixture(scope="module")
def demo():
    images, labels, ids = load_demo("test")
    return load_demo_model(), images[:12].float() / 255, labels[:12], ids[:12]


def comparable(table: pa.Table) -> list[dict]:
    rows = [{**row, "params": without_batch(row["params"])}
            for row in table.drop(["image_index", "wall_time_s"]).to_pylist()]
    return sorted(rows, key=lambda row: (row["image_id"], row["certifier"]))


def test_same_seed_gives_the_same_table_for_any_batch_size_and_image_order(demo):
    model, images, labels, _ = demo
    first = pipeline.certify(model, images, labels, CERTIFIERS, seed=0, batch_size=64)
    assert comparable(first) == comparable(pipeline.certify(model, images, labels, CERTIFIERS, seed=0,
                                                            batch_size=1000))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    shuffled = pipeline.certify(model, images[order], labels[order], CERTIFIERS, seed=0, batch_size=1000)
    assert comparable(first) == comparable(shuffled)
    other_seed = pipeline.certify(model, images, labels, CERTIFIERS, seed=1, batch_size=64)
    assert comparable(first) != comparable(other_seed)


def test_table_follows_the_schema_and_records_every_setting(demo):
    model, images, labels, ids = demo
    table = pipeline.certify(model, images, labels, CERTIFIERS, seed=7, image_ids=ids)
    assert table.schema == results.SCHEMA
    assert table.num_rows == 2 * len(images)
    assert all(field.metadata[b"description"] for field in table.schema)
    row = table.to_pylist()[1]
    assert row["certifier"] == "topk" and row["image_id"] == ids[0] and row["seed"] == 7
    assert row["status"] == "ok" and row["precision"] == "fp32" and row["device"] == "cpu"
    params = json.loads(row["params"])
    assert params["k"] == 3 and params["bound"] == "simuem" and params["precision"] == "fp32"
    assert params["noise_scheme"].startswith("blake2b-blocks64/torch-cpu")
    accuracy = sum(r["correct"] for r in table.to_pylist() if r["certifier"] == "cohen") / len(images)
    assert accuracy >= 0.75  # the demo model is trained for sigma = 0.25


def test_cohen_and_topk_share_forward_passes(demo):
    model, images, labels, _ = demo
    seen = []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            seen.append(len(x))
            return self.inner(x)

    table = pipeline.certify(Counting(), images, labels, CERTIFIERS, batch_size=1000)
    assert sum(seen) == len(images) * (50 + 300) + 1  # selection + shared estimation + one probe
    assert table.column("forward_passes").to_pylist()[:2] == [350, 300]
    shared = [json.loads(params).get("shared_passes", 0) for params in table.column("params").to_pylist()[:2]]
    assert shared == [0, 300]  # TopK's estimation draws are Cohen's, paid for in Cohen's row


def test_topk_without_labels_certifies_the_selected_class(demo):
    model, images, _, _ = demo
    rows = pipeline.certify(model, images[:3], None, [TopK(k=2, sigma=0.25, n=200, n0=30)]).to_pylist()
    assert all(row["n0"] == 30 and row["label"] is None and row["correct"] is None for row in rows)
    assert any(not row["abstained"] for row in rows)


def test_bf16_is_recorded_in_every_certificate(demo):
    model, images, labels, _ = demo
    table = pipeline.certify(model, images[:2], labels[:2], CERTIFIERS, precision="bf16")
    assert set(table.column("precision").to_pylist()) == {"bf16"}
    assert all(json.loads(p)["precision"] == "bf16" for p in table.column("params").to_pylist())


@pytest.mark.parametrize(("make", "setting"), [
    (lambda: Cohen(sigma=0.0), "sigma"),
    (lambda: Cohen(sigma=-0.25), "sigma"),
    (lambda: Cohen(sigma=float("nan")), "sigma"),
    (lambda: Cohen(sigma=0.25, alpha=0.0), "alpha"),
    (lambda: TopK(sigma=0.25, alpha=1.0), "alpha"),
    (lambda: Cohen(sigma=0.25, n0=0), "n0"),
    (lambda: Cohen(sigma=0.25, n=0), "n"),
    (lambda: TopK(sigma=0.25, k=0), "k"),
    (lambda: TopK(sigma=0.25, bound="goodman"), "bound"),
])
def test_invalid_certifier_settings_name_the_setting(make, setting):
    with pytest.raises(ValueError, match=rf"\b{setting} must"):
        make()


@pytest.mark.parametrize(("images", "message"), [
    (torch.full((2, 3, 32, 32), 1.5), "images must lie in"),
    (torch.full((2, 3, 32, 32), -0.1), "images must lie in"),
    (torch.rand(3, 32, 32), r"images must be a non-empty float tensor \[B, C, H, W\]"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "images must be a float tensor"),
    (torch.full((2, 3, 32, 32), float("nan")), "images must be finite"),
])
def test_invalid_images_are_rejected(demo, images, message):
    with pytest.raises(ValueError, match=message):
        pipeline.certify(demo[0], images, None, CERTIFIERS)


def test_invalid_run_arguments_are_rejected(demo):
    model, images, labels, _ = demo
    with pytest.raises(ValueError, match="k must be smaller than the number of classes"):
        pipeline.certify(model, images, labels, [TopK(sigma=0.25, k=10)])
    with pytest.raises(ValueError, match="labels must hold one label per image"):
        pipeline.certify(model, images, labels[:3], CERTIFIERS)
    with pytest.raises(ValueError, match="labels must lie in"):
        pipeline.certify(model, images, labels + 10, CERTIFIERS)
    with pytest.raises(ValueError, match="certifiers"):
        pipeline.certify(model, images, labels, [])
    with pytest.raises(ValueError, match="image_ids must be unique"):
        pipeline.certify(model, images, labels, CERTIFIERS, image_ids=["a"] * len(images))
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.certify(model, images, labels, CERTIFIERS, batch_size=0)


def test_readme_documents_every_result_column():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert [name for name in results.SCHEMA.names if f"| `{name}` |" not in readme] == []
