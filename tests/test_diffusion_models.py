"""The diffusion denoisers against the fixtures made with openai/guided-diffusion's and openai/improved-diffusion's
own code: the published models' key layouts build exactly (on the meta device), their configurations and the
small models' are read back from the keys, t* is the authors' for every sigma and schedule, and the small
models reproduce the reference's raw network outputs and one-shot denoised images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models import load_any_denoiser, load_demo_model
from pipeline.models.diffusion import (
    GUIDED_256,
    GUIDED_SCHEDULE,
    IMPROVED_CIFAR,
    IMPROVED_SCHEDULE,
    OneShotDenoiser,
    infer_config,
    read_diffusion,
)
from pipeline.models.unet import UNet, UNetConfig

DIFFUSION = Path(__file__).resolve().parents[2] / "shared" / "data" / "reference" / "diffusion"
FAMILIES = {"guided": "guided-diffusion", "improved": "improved-diffusion"}
SCHEDULES = {"guided": GUIDED_SCHEDULE, "improved": IMPROVED_SCHEDULE}
# channel_mult by image size when a config leaves it empty (both codes' create_model)
DEFAULT_MULT = {"guided": {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)},
                "improved": {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}}


@pytest.fixture(scope="module")
def fixtures() -> Path:
    if not (DIFFUSION / "manifest.json").is_file():
        pytest.skip(f"diffusion reference data not found at {DIFFUSION}")
    return DIFFUSION


@pytest.fixture(scope="module")
def manifest(fixtures) -> dict:
    return json.loads((fixtures / "manifest.json").read_text())


@pytest.fixture(scope="module")
def cases(fixtures) -> dict[str, np.ndarray]:
    with np.load(fixtures / "cases.npz") as loaded:
        return dict(loaded)


@pytest.fixture(scope="module")
def small(fixtures) -> dict[str, OneShotDenoiser]:
    """The small fixture models as `model.denoiser: <file>` loads them (`load_any_denoiser`)."""
    loaded = {family: load_any_denoiser(str(fixtures / f"{family}_small.pt"))[0] for family in FAMILIES}
    assert all(isinstance(denoiser, OneShotDenoiser) for denoiser in loaded.values())
    return loaded


def reference_config(family: str, settings: dict) -> UNetConfig:
    """The UNetConfig the authors' create_model builds from a manifest configuration."""
    size = settings["image_size"]
    mult = settings.get("channel_mult", "")
    mult = tuple(int(value) for value in mult.split(",")) if mult else DEFAULT_MULT[family][size]
    head_channels = settings.get("num_head_channels", -1)
    return UNetConfig(
        model_channels=settings["num_channels"], num_res_blocks=settings["num_res_blocks"], channel_mult=mult,
        attention_ds=tuple(sorted(size // int(res) for res in settings["attention_resolutions"].split(","))),
        num_heads=None if head_channels > 0 else settings["num_heads"],
        num_head_channels=head_channels if head_channels > 0 else None,
        resblock_updown=settings.get("resblock_updown", False),
        use_scale_shift_norm=settings["use_scale_shift_norm"], out_channels=6 if settings["learn_sigma"] else 3)


def attention_widths(config: UNetConfig) -> list[int]:
    widths = [config.model_channels * mult for level, mult in enumerate(config.channel_mult)
              if 2 ** level in config.attention_ds]
    return [*widths, config.model_channels * config.channel_mult[-1]]


def same_network(found: UNetConfig, expected: UNetConfig) -> bool:
    """Equal configurations, heads compared as the number each attention layer gets (the keys do not hold
    how the heads were specified)."""
    heads = {"num_heads": 1, "num_head_channels": None}
    return (found.__class__(**{**found.__dict__, **heads}) == expected.__class__(**{**expected.__dict__, **heads})
            and [found.heads(width) for width in attention_widths(found)]
            == [expected.heads(width) for width in attention_widths(expected)])


@pytest.mark.parametrize(("family", "config", "millions"), [("guided", GUIDED_256, 552.8),
                                                             ("improved", IMPROVED_CIFAR, 52.5)])
def test_published_layouts_build_exactly(manifest, family, config, millions):
    assert config == reference_config(family, manifest["guided_256" if family == "guided" else "improved_cifar"])
    with torch.device("meta"):
        net = UNet(config)
    built = {key: list(value.shape) for key, value in net.state_dict().items()}
    assert built == manifest["keys"][family]
    assert list(built) == list(manifest["keys"][family])  # the published order too
    assert round(sum(parameter.numel() for parameter in net.parameters()) / 1e6, 1) == millions
    published = {key: torch.empty(shape, device="meta") for key, shape in manifest["keys"][family].items()}
    assert infer_config(published) == (config, FAMILIES[family])
    described = OneShotDenoiser(net, SCHEDULES[family], FAMILIES[family]).describe()
    assert described["architecture"].endswith("256x256_diffusion_uncond.pt)" if family == "guided"
                                              else "cifar10_uncond_50M_500K.pt)")
    assert infer_config({f"module.{key}": value for key, value in published.items()}) == (config, FAMILIES[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_small_configurations_are_read_from_their_keys(manifest, small, family):
    found = small[family].net.config
    assert same_network(found, reference_config(family, manifest[f"{family}_small"]))
    assert small[family].family == FAMILIES[family]
    assert small[family].schedule == SCHEDULES[family]
    described = small[family].describe()
    settings = manifest[f"{family}_small"]
    assert (described["schedule"], described["steps"]) == (settings["noise_schedule"], settings["diffusion_steps"])
    assert described["timestep_rescale"] == (1000 / 4000 if settings["rescale_timesteps"] else 1.0)
    assert described["learn_sigma"] is settings["learn_sigma"]


def test_heads_given_override_the_inferred_ones(fixtures, cases, small):
    """The keys do not hold the number of heads: given ones are used, and the raw outputs tell them apart (2
    heads instead of the fixture's 4 move them by about 2e-3, 20 times the tolerance the fixtures are met to)."""
    state = torch.load(fixtures / "guided_small.pt", weights_only=True)
    as_published = read_diffusion(state, num_head_channels=16)  # the fixture's own setting: 4 heads of 16
    two_heads = read_diffusion(state, num_heads=2)
    assert as_published.net.config.heads(64) == small["guided"].net.config.heads(64) == 4
    t, abar = small["guided"].timestep(0.25)
    x_t = float(np.sqrt(abar)) * (2 * torch.from_numpy(cases["guided_x_sigma0.25"][:1]) - 1)
    reference, t_model = torch.from_numpy(cases["guided_net_sigma0.25"][:1]), torch.tensor([float(t)])
    with torch.no_grad():
        torch.testing.assert_close(as_published.net_output(x_t, t_model), reference, rtol=0, atol=1e-4)
        assert (two_heads.net_output(x_t, t_model) - reference).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_t_star_is_the_authors_for_every_sigma(manifest, family):
    schedule = SCHEDULES[family]
    abar = schedule.alphas_cumprod
    for sigma, (t_ref, ratio_ref) in manifest["t_star"][family].items():
        t, abar_t = schedule.t_star(float(sigma))
        assert t == t_ref
        assert abar_t == pytest.approx(manifest["t_star"][f"{family}_alpha_bar"][sigma], rel=1e-12)
        assert np.sqrt(1 - abar_t) / np.sqrt(abar_t) == pytest.approx(ratio_ref, rel=1e-12)
        # the first such t: the step before has less noise than 2 sigma
        assert t == 1 or np.sqrt(1 - abar[t - 1]) / np.sqrt(abar[t - 1]) < 2 * float(sigma)
    with pytest.raises(ValueError, match="beyond"):
        schedule.t_star(1e6)
    with pytest.raises(ValueError, match="sigma > 0"):
        schedule.t_star(0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_t_star_is_the_first_step_reaching_twice_sigma(family):
    schedule = SCHEDULES[family]
    abar = schedule.alphas_cumprod
    ratio = np.sqrt(1 - abar) / np.sqrt(abar)
    assert np.all(np.diff(abar) < 0) and abar[0] < 1
    last = 0
    for sigma in np.geomspace(1e-3, ratio[-1] / 2, 400):
        t, abar_t = schedule.t_star(float(sigma))
        assert abar_t == abar[t] and ratio[t] >= 2 * sigma and (t == 1 or ratio[t - 1] < 2 * sigma)
        assert t >= last  # more noise, a later step
        last = t
    if family == "improved":  # the cosine schedule's betas are clipped at 0.999: the last one is
        assert abar[-1] / abar[-2] == pytest.approx(1 - 0.999, rel=1e-9)
    else:  # linear betas from 1e-4 to 0.02
        assert (1 - abar[0], 1 - abar[-1] / abar[-2]) == pytest.approx((1e-4, 0.02), rel=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sigma", ["0.25", "0.5"])
def test_small_models_reproduce_the_reference(cases, small, family, sigma):
    denoiser = small[family]
    noisy = torch.from_numpy(cases[f"{family}_x_sigma{sigma}"])
    t, abar = denoiser.timestep(float(sigma))
    assert t == int(cases[f"{family}_t_sigma{sigma}"])
    x_t = float(np.sqrt(abar)) * (2 * noisy - 1)
    t_model = torch.full((len(noisy),), t * denoiser.schedule.timestep_rescale)
    with torch.no_grad():
        raw = denoiser.net_output(x_t, t_model)
        out = denoiser(noisy, torch.full((len(noisy),), float(sigma)))
    torch.testing.assert_close(raw, torch.from_numpy(cases[f"{family}_net_sigma{sigma}"]), rtol=0, atol=1e-4)
    torch.testing.assert_close(out, torch.from_numpy(cases[f"{family}_out_sigma{sigma}"]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_row_is_denoised_at_its_own_sigma(cases, small, family):
    quarter, half = (torch.from_numpy(cases[f"{family}_x_sigma{sigma}"]) for sigma in ("0.25", "0.5"))
    clean = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noisy = torch.stack([half[0], quarter[0], clean[0], quarter[1], half[1], half[2], clean[1], quarter[2]])
    sigma = torch.tensor([0.5, 0.25, 0.0, 0.25, 0.5, 0.5, 0.0, 0.25])
    with torch.no_grad():
        out = small[family](noisy, sigma)
    expected_quarter, expected_half = (torch.from_numpy(cases[f"{family}_out_sigma{s}"]) for s in ("0.25", "0.5"))
    torch.testing.assert_close(out[[1, 3, 7]], expected_quarter, rtol=0, atol=1e-4)
    torch.testing.assert_close(out[[0, 4, 5]], expected_half, rtol=0, atol=1e-4)
    assert torch.equal(out[[2, 6]], clean)  # sigma 0: unchanged, bit for bit
    assert torch.equal(small[family](clean, torch.zeros(2)), clean)
    for bad in (-0.25, float("nan")):
        with pytest.raises(ValueError, match=">= 0"):
            small[family](clean, torch.tensor([0.25, bad]))


def test_bf16_autocast_runs_close_to_float32(cases, small):
    """Under bf16 autocast (8 bits of mantissa in the convolutions; GroupNorm and softmax in float32) the denoised
    pixels (in [0, 1]) stay within 0.01 of float32's, 1e-3 on average: loose bounds, 25 and 20 times what the
    small fixture models give."""
    noisy = torch.from_numpy(cases["guided_x_sigma0.5"][:1])  # one image: bf16 convolutions are slow on CPUs
    sigma = torch.full((1,), 0.5)
    for denoiser in small.values():
        with torch.no_grad():
            exact = denoiser(noisy, sigma)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = denoiser(noisy, sigma)
        assert low.dtype == torch.float32 and torch.isfinite(low).all()
        assert (low - exact).abs().max() < 0.01 and (low - exact).abs().mean() < 1e-3
        assert not torch.equal(low, exact)  # bf16 did run


def test_other_state_dicts_are_not_diffusion_models(fixtures):
    assert read_diffusion(load_demo_model().state_dict()) is None
    state = torch.load(fixtures / "guided_small.pt", weights_only=True)
    assert read_diffusion({f"module.{key}": value for key, value in state.items()}) is not None
    broken = {key: value for key, value in state.items() if key != "input_blocks.3.1.proj_out.weight"}
    with pytest.raises(ValueError, match=r"missing keys input_blocks\.3\.1\.proj_out\.weight"):
        read_diffusion(broken)


def test_a_ray_run_certifies_two_sigmas_behind_one_diffusion_denoiser_and_records_t_star(
        fixtures, manifest, ray_cluster, tmp_path):
    """The config path end to end: the small guided-diffusion UNet (a published layout) as model.denoiser in
    front of a timm classifier whose 160x160 input the 32x32 digits are resized to, cohen at sigma 0.25 and
    0.5 in one run; each row records the t* and abar of its own sigma, and the manifest both."""
    import hashlib

    timm = pytest.importorskip("timm")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from pipeline.config import validate
    from pipeline.distributed.certify import run

    torch.manual_seed(0)
    classifier = tmp_path / "test_vit.safetensors"
    safetensors_torch.save_file(timm.create_model("test_vit.r160_in1k", num_classes=10).state_dict(), classifier)
    denoiser = fixtures / "guided_small.pt"
    config = validate({"run_id": "diffusion", "output": str(tmp_path / "runs"), "seed": 0, "batch_size": 16,
                       "actors": {"count": 1, "cpus": 1}, "dataset": {"layout": "demo", "max": 2},
                       "model": {"name": "timm/test_vit.r160_in1k", "weights": str(classifier),
                                 "denoiser": str(denoiser)},
                       "certifiers": [{"name": "cohen", "sigma": sigma, "n0": 8, "n": 24} for sigma in (0.25, 0.5)]})
    rows = run(config).results.to_pylist()
    assert len(rows) == 4 and all(row["status"] == "ok" for row in rows)
    digest = hashlib.sha256(denoiser.read_bytes()).hexdigest()
    for row in rows:
        record = json.loads(row["denoiser"])
        t_star, alpha_bar = record["t_star"], record["alpha_bar"]
        sigma = f"{row['sigma']:g}"
        assert t_star == manifest["t_star"]["guided"][sigma][0]
        assert alpha_bar == pytest.approx(manifest["t_star"]["guided_alpha_bar"][sigma], rel=1e-12)
        assert record["weights"] == str(denoiser) and record["weights_sha256"] == digest
        assert record["architecture"]["schedule"] == "linear" and record["architecture"]["steps"] == 1000
        assert json.loads(row["classifier"])["resized_from"] == [3, 32, 32]
    recorded = json.loads((tmp_path / "runs" / "diffusion" / "manifest.json").read_text())["denoiser"]
    assert {key: value["t_star"] for key, value in recorded.items()} == {"0.25": 145, "0.5": 259}
