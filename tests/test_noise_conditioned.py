"""A noise-conditioned model (a diffusion denoiser in front of a classifier) gets each row's own noise level,
in batches that mix noise levels, compiled or eager, in the counting and the sequential modes; a clean
pass gets sigma 0; a certifier whose head cannot pass the noise level is refused, not run as if clean."""

import numpy as np
import pytest
import torch
from torch import nn

import pipeline
from pipeline.certifiers import Center, Cohen
from pipeline.engine import Draws, Engine
from pipeline.models.denoisers import Denoised
from pipeline.run import check_model

LEVELS = 5


class NoiseLevel(nn.Module):
    """A 'denoiser' that replaces every pixel of a row by the row's noise level: what the classifier behind
    it sees reveals the sigma it was given."""

    noise_conditioned = True

    def forward(self, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.to(noisy.dtype).view(-1, 1, 1, 1).expand_as(noisy).clone()

    def timestep(self, sigma: float) -> tuple[int, float]:
        return round(100 * sigma), 1 - sigma / 2


class LevelClassifier(nn.Module):
    """Class round(4 * mean pixel): 0 for a clean pass, 1 at sigma 0.25, 2 at sigma 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = x.float().mean(dim=(1, 2, 3)) * 4
        return -(torch.arange(LEVELS, device=x.device)[None, :] - level[:, None]) ** 2


def _model() -> Denoised:
    return Denoised(LevelClassifier(), NoiseLevel())


def _images() -> torch.Tensor:
    return torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_every_row_gets_its_own_noise_level_in_mixed_batches():
    model = _model()
    assert model.noise_conditioned
    certifiers = [Cohen(sigma=0.25, n0=10, n=50), Cohen(sigma=0.5, n0=10, n=50),
                  Cohen(sigma=0.5, n0=10, n=200, mode="sequential", radii=[0.1])]
    for batch_size in (7, 64):  # 7: every batch mixes the streams of both sigmas
        table = pipeline.certify(model, _images(), [1, 2, 1], certifiers, batch_size=batch_size).to_pylist()
        by_setting = {(row["setting"], row["image_index"]): row for row in table}
        for image in range(3):
            for certifier, level in zip(certifiers, (1, 2, 2), strict=True):
                row = by_setting[(certifier.setting, image)]
                assert row["status"] == "ok" and row["prediction"] == level, row
            assert by_setting[(certifiers[0].setting, image)]["count"] == 50  # every draw, not some


def test_a_clean_pass_gets_sigma_zero_and_compiled_counts_equal_eager():
    engine = Engine(_model(), batch_size=5)
    assert engine.logits(_images()).argmax(dim=1).tolist() == [0, 0, 0]
    requests = [Draws("estimation", 0.25, 12), Draws("estimation", 0.5, 12)]
    eager = engine.session().count(_images(), ["a", "b", "c"], 0, requests)
    compiled = Engine(_model(), batch_size=5, compile="eager").session().count(_images(), ["a", "b", "c"], 0,
                                                                               requests)
    for request, level in zip(requests, (1, 2), strict=True):
        expected = np.zeros((3, LEVELS), dtype=np.int64)
        expected[:, level] = 12
        np.testing.assert_array_equal(eager[request], expected)
        np.testing.assert_array_equal(compiled[request], expected)


def test_a_certifier_with_its_own_head_is_refused_for_a_noise_conditioned_model():
    center = Center(sigma=0.25, eps_in=0.02, n=20, m=20, output="logits")
    with pytest.raises(ValueError, match="does not pass their noise level to a noise-conditioned model"):
        pipeline.certify(_model(), _images()[:1], [1], [center], batch_size=8)
    with pytest.raises(ValueError, match="center run their own heads on the noisy inputs"):
        check_model(_model(), (3, 8, 8), [Cohen(sigma=0.25), center])  # a run refuses it before any work


def test_a_denoiser_that_is_not_noise_conditioned_composes_as_before():
    plain = Denoised(LevelClassifier(), nn.Identity())
    assert not plain.noise_conditioned
    x = torch.full((2, 3, 4, 4), 0.5)
    assert plain(x).argmax(dim=1).tolist() == [2, 2]
