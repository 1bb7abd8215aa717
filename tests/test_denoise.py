"""Denoisers: the losses and sample generation on known inputs, the artifact, Ray Train to S3, clear errors."""

import json
import uuid
from pathlib import Path

import boto3
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DenoiserConfig, validate
from pipeline.denoise import losses
from pipeline.denoise.data import few_sample_subset
from pipeline.denoise.generate import GenerationSettings, boundary_samples, cache_key, interpolated_samples
from pipeline.denoise.train import fit
from pipeline.distributed.certify import run
from pipeline.distributed.train import train_denoiser
from pipeline.models import DemoCNN, ModelSpec, load_model
from pipeline.models.denoisers import Denoised, DnCNN, load_denoiser
from pipeline.results import read_results
from pipeline.storage import Storage, open_location


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return DemoCNN().eval()


def test_mmd_is_zero_for_identical_sets_and_grows_with_a_shift():
    torch.manual_seed(0)
    points = torch.randn(32, 8)
    assert losses.mmd_rbf(points, points).abs() < 1e-6
    shifts = [float(losses.mmd_rbf(points, points + shift)) for shift in (0.1, 0.5, 2.0)]
    assert 0 < shifts[0] < shifts[1] < shifts[2]


def test_reversal_layer_flips_and_scales_the_gradient():
    x = torch.randn(5, requires_grad=True)
    losses.reverse_gradient(x, 0.7).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((5,), -0.7))
    assert torch.equal(losses.reverse_gradient(x, 0.7), x)
    assert losses.dann_lambda(0.0) == 0 and losses.dann_lambda(1.0) == pytest.approx(2 * (2 / (1 + torch.e ** -10) - 1))


def test_cosine_loss_is_zero_for_aligned_logits():
    logits = torch.randn(6, 10)
    assert losses.cosine_loss(3 * logits, logits).abs() < 1e-6
    assert losses.cosine_loss(-logits, logits) == pytest.approx(2.0)


def test_pgd_stays_in_its_ball_and_raises_the_loss(classifier):
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(8)
    settings = GenerationSettings(steps=10)
    adversarial = boundary_samples(classifier, images, labels, settings)
    assert (adversarial - images).abs().max() <= settings.eps + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(classifier(adversarial), labels) > F.cross_entropy(classifier(images), labels)


def test_interpolation_moves_logits_toward_the_target_and_reference_mode_takes_one_step(classifier):
    images, labels = torch.rand(4, 3, 32, 32), torch.arange(4)
    paper = GenerationSettings(steps=5, interp_steps=50, interp_tolerance=1e-6)
    boundary = boundary_samples(classifier, images, labels, paper)
    with torch.no_grad():
        target = 0.8 * classifier(images) + 0.2 * classifier(boundary)
    moved = interpolated_samples(classifier, images, boundary, paper)
    with torch.no_grad():
        before = (classifier(images) - target).pow(2).mean(1)
        after = (classifier(moved) - target).pow(2).mean(1)
    assert (after < before).all()
    reference = interpolated_samples(classifier, images, boundary,
                                     paper.model_copy(update={"interp_mode": "reference"}))
    assert (reference - images).abs().max() <= paper.interp_lr * 1.01


def test_cache_key_changes_with_the_classifier_and_every_setting(classifier):
    ids = ["a", "b"]
    base = cache_key(classifier, GenerationSettings(), ids)
    assert cache_key(classifier, GenerationSettings(), ids) == base
    other = DemoCNN().eval()
    assert cache_key(other, GenerationSettings(), ids) != base
    changes = {"eps": 4 / 255, "step": 1 / 255, "steps": 10, "random_start": False, "mix": 0.7, "interp_steps": 20,
               "interp_lr": 1e-2, "interp_tolerance": 1e-4, "interp_mode": "reference", "seed": 1}
    assert set(changes) == set(GenerationSettings.model_fields)
    for name, value in changes.items():
        assert cache_key(classifier, GenerationSettings(**{name: value}), ids) != base, name
    assert cache_key(classifier, GenerationSettings(), ["a", "c"]) != base


def test_denoiser_starts_as_the_identity_and_composes():
    denoiser = DnCNN(depth=5, channels=8).eval()
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(denoiser(x), x)
    assert len([m for m in DnCNN().modules() if isinstance(m, nn.Conv2d)]) == 17
    assert DnCNN(wide=True).dncnn[0].out_channels == 128


def test_clear_errors_for_bad_checkpoints_subsets_and_black_box(tmp_path):
    torch.save(DnCNN(depth=7, channels=8).state_dict(), tmp_path / "denoiser.pt")
    (tmp_path / "artifact.json").write_text('{"architecture": {"name": "dncnn", "depth": 5, "channels": 8}}')
    with pytest.raises(ValueError, match=r"does not fit DnCNN\("):
        load_denoiser(str(tmp_path))
    with pytest.raises(ValueError, match="asked for, but class 1 has only 3"):
        few_sample_subset([0, 0, 0, 0, 1, 1, 1], per_class=4)
    with pytest.raises(ValueError, match="black_box needs a `surrogate`"):
        DenoiserConfig.from_dict({"classifier": {"name": "demo_cnn"}, "access": "black_box"})
    with pytest.raises(ValueError, match="objective must be one of"):
        DenoiserConfig.from_dict({"classifier": {"name": "demo_cnn"}, "objective": "l1"})


def test_few_sample_subset_is_seeded_and_holds_out_validation():
    labels = [c for c in range(10) for _ in range(30)]
    train, validation = few_sample_subset(labels, fraction=0.1, seed=3, validation=0.2)
    assert len(train) + len(validation) == 30 and len(validation) == 10 and not set(train) & set(validation)
    again = few_sample_subset(labels, fraction=0.1, seed=3, validation=0.2)
    assert (again[0] == train).all() and (few_sample_subset(labels, fraction=0.1, seed=4)[0] != train).any()


def test_decrop_stage_two_ramps_from_zero_and_the_artifact_comes_from_it(tmp_path, monkeypatch):
    """Spec §4.4: the reversal weight follows DANN's schedule over stage 2's own iterations, from 0; and the
    best checkpoint is chosen among stage-2 epochs. Stage 2 here runs at a learning rate that wrecks the
    denoiser, so its validation accuracy falls below stage 1's: a selection across both stages would hand
    back a stage-1 model with no discriminator training."""
    progress = []
    schedule = losses.dann_lambda
    monkeypatch.setattr(losses, "dann_lambda", lambda p, weight=2.0: progress.append(p) or schedule(p, weight))
    config = DenoiserConfig.from_dict({
        "classifier": {"name": "demo_cnn"}, "objective": "decrop", "denoiser": {"depth": 3, "channels": 8},
        "subset": {"per_class": 3, "seed": 3, "validation": 0.34}, "epochs": 2, "second_epochs": 2,
        "second_lr": 5.0, "batch_size": 5, "generation": {"steps": 2, "interp_steps": 3},
        "output": str(tmp_path), "augment": False})
    reports = []
    best = fit(config, lambda metrics, directory: reports.append(
        (metrics, directory and json.loads((directory / "artifact.json").read_text()))))
    assert progress == pytest.approx([step / 8 for step in range(8)])  # stage 2: 2 epochs of 4 batches of 5
    by_stage = {stage: max(m["val_accuracy"] for m, _ in reports if m["stage"] == stage) for stage in (1, 2)}
    assert by_stage[1] > by_stage[2]  # the experiment's premise: stage 1 scored higher
    artifacts = [artifact for _, artifact in reports if artifact is not None]
    assert (artifacts[-1]["stage"], artifacts[-1]["phase"]) == (2, "decrop2")
    assert (best["stage"], best["val_accuracy"]) == (2, by_stage[2])
    assert all(m["selection_score"] == (m["val_accuracy"] if m["stage"] == 2 else -1.0) for m, _ in reports)


def test_decrop_on_ray_train_writes_checkpoints_to_s3_that_certify(ray_cluster, s3_endpoint, tmp_path):
    """Two stages of DE-CROP, two CPU workers (DDP), checkpoints to a local S3 server; the best artifact
    then certifies through the distributed job with the classifier it was trained for."""
    bucket = f"denoisers-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    storage = {"endpoint_url": s3_endpoint}
    config = DenoiserConfig.from_dict({
        "classifier": {"name": "demo_cnn"}, "objective": "decrop", "denoiser": {"depth": 3, "channels": 8},
        "subset": {"per_class": 3, "seed": 3, "validation": 0.34}, "epochs": 1, "second_epochs": 1,
        "batch_size": 5, "generation": {"steps": 2, "interp_steps": 3}, "output": f"s3://{bucket}/train",
        "run_name": "tiny", "storage": storage, "workers": 2})
    uri = train_denoiser(config)
    assert uri.startswith(f"s3://{bucket}/train/tiny/checkpoint_")
    assert train_denoiser(config) == uri  # a rerun resumes after the checkpoint Ray Train hands it: nothing to train
    _, metadata = load_denoiser(uri, Storage(**storage))
    assert metadata["objective"] == "decrop" and metadata["architecture"]["depth"] == 3
    assert (metadata["stage"], metadata["phase"]) == (2, "decrop2")
    assert len(metadata["subset"]["train_ids"]) == 20
    assert ModelSpec(**metadata["classifier"]["spec"]) == ModelSpec("demo_cnn")
    assert isinstance(load_model(ModelSpec("demo_cnn", denoiser=uri), Storage(**storage)), Denoised)

    run_uri = run(validate({"run_id": "denoised", "output": str(tmp_path), "storage": storage, "images_per_batch": 4,
                            "dataset": {"layout": "demo", "max": 4}, "actors": {"count": 1, "cpus": 1},
                            "model": {"name": "demo_cnn", "denoiser": uri},
                            "certifiers": [{"name": "cohen", "sigma": 0.25, "n0": 20, "n": 100}]})).uri
    table = read_results(open_location(run_uri).join("results"))
    assert table.num_rows == 4 and set(table["status"].to_pylist()) == {"ok"}


def test_generation_as_a_ray_data_job_equals_generation_in_process(ray_cluster):
    from pipeline.denoise.generate import generate
    from pipeline.distributed.generate import generate_with_ray

    spec = ModelSpec("demo_cnn")
    images, labels, ids = torch.rand(6, 3, 32, 32), torch.arange(6), [f"img{i}" for i in range(6)]
    settings = GenerationSettings(steps=3, interp_steps=4)
    expected = generate(load_model(spec), images, labels, ids, settings, batch_size=4)
    produced = generate_with_ray(spec, Storage(), actors=1, batch_size=2)(None, images, labels, ids, settings)
    for mine, theirs in zip(produced, expected, strict=True):
        torch.testing.assert_close(mine, theirs)


def test_training_images_use_the_certification_transform():
    """A training config names its dataset like a run does: an ImageNet layout without `size` is refused,
    naming the key, instead of being cropped to the demo's 32x32."""
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"dataset.size \(the centre-crop side\) must be an integer >= 1, got None"):
        DenoiserConfig.from_dict({"classifier": {"name": "resnet18"},
                                  "dataset": {"layout": "imagenet_folder", "root": "/data/imagenet/train"}})
    config = DenoiserConfig.from_dict({"classifier": {"name": "demo_cnn"}})
    assert config.dataset.transform.shape == (3, 32, 32) and config.dataset.split == "train"


class Killed(Exception):
    """Stands in for a kill of the training process."""


def test_in_process_training_resumes_after_a_kill_and_best_never_gets_worse(tmp_path, monkeypatch, caplog):
    """A training killed after epoch 2 of 5 resumes after epoch 2 (not from epoch 1), `best/` is replaced
    only by better artifacts, one epoch's artifact is kept for the next resume, and a folder holding another
    config is refused."""
    import logging

    from pipeline.denoise import train

    config = DenoiserConfig.from_dict({
        "classifier": {"name": "demo_cnn"}, "objective": "stab", "denoiser": {"depth": 3, "channels": 8},
        "subset": {"per_class": 3, "seed": 3, "validation": 0.34}, "epochs": 5, "batch_size": 5,
        "output": str(tmp_path), "run_name": "r"})
    validate, seen = train.validate, []

    def killed_in_epoch_3(run):
        if len(seen) == 2:
            raise Killed
        seen.append(1)
        return validate(run)

    monkeypatch.setattr(train, "validate", killed_in_epoch_3)
    with pytest.raises(Killed):
        train.fit_local(config)
    folder = tmp_path / "r"
    last = json.loads((folder / "last.json").read_text())
    assert last["epoch"] == 2 and [epoch["epoch"] for epoch in last["history"]] == [1, 2]
    assert set(last["sha256"]) == {"denoiser.pt", "artifact.json"}
    before = json.loads((folder / "best" / "artifact.json").read_text())["metrics"]

    monkeypatch.setattr(train, "validate", validate)
    with caplog.at_level(logging.DEBUG, logger="pipeline.denoise.train"):
        uri = train.fit_local(config)
    trained = [int(line.split()[1]) for line in caplog.messages if line.startswith("epoch ")]
    assert f"resuming {folder} after epoch 2" in caplog.messages and trained == [3, 4, 5]
    after = json.loads((Path(uri) / "artifact.json").read_text())["metrics"]
    assert (after["selection_score"], after["val_accuracy"]) >= (before["selection_score"], before["val_accuracy"])
    assert [path.name for path in (folder / "epochs").iterdir()] == ["5"]
    with pytest.raises(ValueError, match="comes from a training with another config"):
        train.fit_local(config.model_copy(update={"lr": 0.5}))
    # a changed weights file is refused before anything loads it
    (folder / "epochs" / "5" / "denoiser.pt").write_bytes(b"not the weights this training wrote")
    with pytest.raises(ValueError, match=r"denoiser\.pt differs from the file this training wrote"):
        train.fit_local(config)
