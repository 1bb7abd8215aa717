"""Cost per draw of diffusion denoised smoothing against the classifier alone, on this machine's CPU.

    python benchmarks/diffusion.py                   # the small fixture UNets + the demo CNN, batch 64
    python benchmarks/diffusion.py --batch 256 --repeats 5 --threads 2

Each draw of the composition is one one-shot denoising (a UNet forward at the sigma's t*) and one classifier
forward; the classifier alone is one forward. A second table (`--images K`, 0 to skip) certifies K demo
digits with the guided composition through `pipeline.certify`, Cohen's CERTIFY at N against the sequential
mode deciding radius 0.25 within the same N: the forward passes each spends per image, and its decisions.
In the first table both run on the same noisy 3x32x32 inputs under torch.no_grad,
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

import pipeline
from pipeline.certifiers import Cohen
from pipeline.data.demo import load_demo
from pipeline.models import load_demo_model
from pipeline.models.denoisers import Denoised
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
    parser.add_argument("--images", type=int, default=4, help="demo digits for the sequential table (0: skip)")
    parser.add_argument("--n", type=int, default=512, help="N of both settings of the sequential table")
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
    if args.images:
        sequential_savings(classifier, args)


def sequential_savings(classifier: torch.nn.Module, args: argparse.Namespace) -> None:
    """What the sequential mode spends against CERTIFY at the same N, behind the guided small UNet."""
    denoiser = read_diffusion(torch.load(args.fixtures / "guided_small.pt", weights_only=True))
    images, labels, ids = load_demo()
    images, labels, ids = images[:args.images].float() / 255, labels[:args.images], ids[:args.images]
    settings = {f"cohen certify, n0 64, N {args.n}": Cohen(sigma=args.sigma, n0=64, n=args.n),
                f"cohen sequential, radius 0.25, N up to {args.n}": Cohen(sigma=args.sigma, n=args.n,
                                                                          mode="sequential", radii=[0.25])}
    print(f"\n{args.images} demo digits behind guided_small + demo CNN, sigma {args.sigma}, N {args.n}\n")
    print("| setting | forward passes / image | seconds / image | certified at r = 0.25 | votes for the top class |")
    print("|---|---:|---:|---:|---|")
    for label, setting in settings.items():  # one at a time, so neither reuses the other's votes
        table = pipeline.certify(Denoised(classifier, denoiser), images, labels.tolist(), [setting], image_ids=ids,
                                 batch_size=args.batch).to_pylist()
        passes = sum(row["forward_passes"] for row in table) / len(table)
        seconds = sum(row["wall_time_s"] for row in table) / len(table)
        certified = sum(bool(row["correct"]) and (row["radius"] or 0) >= 0.25 for row in table)
        shares = ", ".join(f"{row['count']}/{row['n']}" for row in table)
        print(f"| {label} | {passes:,.0f} | {seconds:.1f} | {certified}/{len(table)} | {shares} |")


if __name__ == "__main__":
    main()
