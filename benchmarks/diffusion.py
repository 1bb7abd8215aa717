"""Cost per draw of diffusion denoised smoothing against the classifier alone, on this machine's CPU.

    python benchmarks/diffusion.py                   # the small fixture UNets + the demo CNN, batch 64
    python benchmarks/diffusion.py --batch 256 --repeats 5 --threads 2

Each draw of the composition is one one-shot denoising (a UNet forward at the sigma's t*) and one classifier
forward; the classifier alone is one forward. Both run on the same noisy 3x32x32 inputs under torch.no_grad,
timed as the best of `--repeats` after one warm-up. The UNets are the small random-weight models of the
reference fixtures (guided- and improved-diffusion layouts, about 1.4 M and 1.7 M parameters), read through
`read_diffusion`; the published ones are 552.8 M (ImageNet) and 52.5 M (CIFAR-10) parameters.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.models import load_demo_model
from pipeline.models.diffusion import read_diffusion

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "data" / "reference" / "diffusion"


def best_seconds(step: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed calls of `step`, after one untimed warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="draws per forward pass (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, the best kept (default 3)")
    parser.add_argument("--sigma", type=float, default=0.25, help="noise level in pixel units (default 0.25)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steady on shared cores)")
    parser.add_argument("--fixtures", type=Path, default=FIXTURES, help="the reference's diffusion/ folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    classifier = load_demo_model().eval()
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(args.batch, 3, 32, 32, generator=generator)
    noisy = clean + args.sigma * torch.randn(clean.shape, generator=generator)
    sigma = torch.full((args.batch,), args.sigma)
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; batch {args.batch}, sigma {args.sigma}, best of {args.repeats}\n")
    print("| base classifier | parameters | forward passes / s | ms / draw | cost / classifier alone |")
    print("|---|---:|---:|---:|---:|")
    with torch.no_grad():
        alone = best_seconds(lambda: classifier(noisy), args.repeats)
        count = sum(parameter.numel() for parameter in classifier.parameters())
        print(f"| demo CNN alone | {count:,} | {args.batch / alone:,.0f} | {1e3 * alone / args.batch:.3f} | 1 |")
        for family in ("guided", "improved"):
            denoiser = read_diffusion(torch.load(args.fixtures / f"{family}_small.pt", weights_only=True))
            seconds = best_seconds(lambda denoiser=denoiser: classifier(denoiser(noisy, sigma)), args.repeats)
            total = count + sum(parameter.numel() for parameter in denoiser.parameters())
            t_star, _ = denoiser.timestep(args.sigma)
            print(f"| {family}_small UNet (t* {t_star}) + demo CNN | {total:,} | {args.batch / seconds:,.0f} | "
                  f"{1e3 * seconds / args.batch:.3f} | {seconds / alone:.0f} |")


if __name__ == "__main__":
    main()
