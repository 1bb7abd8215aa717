"""The public API: pipeline.certify on the demo model, its schema, its reproducibility, its errors."""

import json
import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from conftest import CountingModel, without_batch
from torch import nn

import pipeline
from pipeline import results
from pipeline.certification import certify_rows
from pipeline.certifiers import Center, Cohen, SmoothReduce, TopK
from pipeline.data.demo import load_demo
from pipeline.engine import Engine
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


class MeanScores(nn.Module):
    """Two class scores from the mean pixel, for inputs of any size; NaN where the mean exceeds `nan_above`."""

    def __init__(self, nan_above: float = math.inf):
        super().__init__()
        self.nan_above = nan_above

    def forward(self, x):
        mean = x.flatten(1).mean(dim=1)
        scores = torch.stack([10 * mean, 10 * (1 - mean)], dim=1)
        return torch.where((mean > self.nan_above)[:, None], torch.full_like(scores, math.nan), scores)


def test_accounting_is_per_call_two_calls_on_one_engine_share_nothing():
    """Two `certify_rows` calls on one engine keep separate accounts: the second's rows equal a fresh
    engine's (shared passes, error rows and certificates), whatever the first one reused or found
    non-finite, even for an image id the first call saw with other pixels."""
    certifiers = [Cohen(sigma=0.25, n0=30, n=300), TopK(sigma=0.25, k=1, n=300),
                  Cohen(sigma=0.25, n0=30, n=3_000, mode="sequential", radii=[0.25])]
    ids, labels = ["a", "b", "c"], [1, 0, 1]
    first_images = torch.tensor([0.2, 0.7, 0.95]).view(3, 1, 1, 1).expand(3, 1, 4, 4).contiguous()
    second_images = torch.tensor([0.2, 0.7, 0.3]).view(3, 1, 1, 1).expand(3, 1, 4, 4).contiguous()
    model = MeanScores(nan_above=0.9)
    engine = Engine(model, batch_size=64)

    def comparable_rows(rows):
        return [{key: value for key, value in row.items() if key != "wall_time_s"} for row in rows]

    first = certify_rows(engine, first_images, labels, certifiers, seed=0, image_ids=ids)
    second = certify_rows(engine, second_images, labels, certifiers, seed=0, image_ids=ids)
    alone = certify_rows(Engine(model, batch_size=64), second_images, labels, certifiers, seed=0, image_ids=ids)
    assert [row["status"] for row in first] == ["ok"] * 6 + ["error"] * 3  # "c" is NaN under noise at first
    assert [row["status"] for row in second] == ["ok"] * 9
    assert comparable_rows(second) == comparable_rows(alone)
    assert comparable_rows(second[:6]) == comparable_rows(first[:6])  # shared passes counted again, not added
    shared = [json.loads(row["params"]).get("shared_passes", 0) for row in second]
    looks = max(n for n in certifiers[2].looks() if n <= 300)  # the looks that Cohen's pass answers
    assert shared == [value for row in second[2::3] for value in (0, 300, 30 + min(row["n"], looks))]


def test_a_sampling_certifiers_passes_reach_its_row_through_its_cost():
    """Smooth-Reduce runs the model once per patch of each draw and center runs a clean pass per image
    beside its draws: each row's forward_passes (its certificate's cost) counts them, so the rows add up
    to the passes the model ran, less the probes of the class count and of the output's shape."""
    images = torch.linspace(0.3, 0.7, 3).view(3, 1, 1, 1).expand(3, 1, 6, 6).contiguous()
    reduce = SmoothReduce(sigma=0.25, patch_size=4, n0=20, n=100)
    counted = CountingModel(MeanScores())
    rows = pipeline.certify(counted, images, [1, 1, 0], [reduce], batch_size=64).to_pylist()
    patches = len(json.loads(rows[0]["params"])["patch_corners"])
    assert patches == 9 and [row["forward_passes"] for row in rows] == [patches * (20 + 100)] * 3
    assert counted.rows == sum(row["forward_passes"] for row in rows) + 1 + patches  # class count, head probes

    center = Center(sigma=0.25, eps_in=0.1, output="logits", n=100, m=200)
    counted = CountingModel(MeanScores())
    rows = pipeline.certify(counted, images, None, [center], batch_size=64).to_pylist()
    assert [row["forward_passes"] for row in rows] == [2 * 100 + 1 + 200] * 3  # search, check, clean, m
    assert counted.rows == sum(row["forward_passes"] for row in rows) + 2  # class count, output's shape
