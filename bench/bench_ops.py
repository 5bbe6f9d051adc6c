"""Time medssl's batched corruption and loss ops against plain per-sample Python-loop references.

    python bench/bench_ops.py --device cpu --out bench/results/ops.json          # 8 x 1 x 96^3
    python bench/bench_ops.py --batch 2 --size 32 --no-step --out bench/results/ops_small.json   # quick check

Each op is timed as the median of ``--repeats`` runs after ``--warmup`` runs (CUDA is
synchronised around every run). On a CPU shared with other jobs, ``--threads 1`` gives far
steadier numbers than oversubscribed intra-op threads. A reference does what a straightforward port of the official
code does: one sample at a time, one patch at a time. The JSON holds the machine, the
configuration and, per op, the batched and reference medians in milliseconds.

To add an op, write ``batched`` (and optionally ``loop``) functions taking (x, generator, config)
and put them in BENCHMARKS under a new name.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from medssl.frequency import (
    DEFAULT_CUTOFFS,
    frequency_corruption,
    highpass_filter,
    histogram_equalised_mask,
    low_frequency_perturbation,
    spectral_patch_mask,
)
from medssl.losses import FrepaLoss
from medssl.models.frepa import FrepaCorruption

from bench_pretrain_step import PRESETS, build, make_step  # bench/ is on sys.path when run as a script

OpFn = Callable[[torch.Tensor, torch.Generator, argparse.Namespace], object]


@dataclass(frozen=True)
class OpBenchmark:
    """batched: the medssl op; loop: per-sample reference, or None when there is none."""

    description: str
    batched: OpFn
    loop: OpFn | None = None


# ---------------------------------------------------------------- per-sample references
def _centred_fft(sample: torch.Tensor) -> torch.Tensor:
    axes = tuple(range(1, sample.ndim))  # sample: (C, *spatial)
    return torch.fft.fftshift(torch.fft.fftn(sample, dim=axes), dim=axes)


def _real_inverse(spectrum: torch.Tensor) -> torch.Tensor:
    axes = tuple(range(1, spectrum.ndim))
    return torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=axes), dim=axes).real


def _patch_regions(spatial: tuple[int, ...], patch: int):
    """(grid index, slices) of every patch, in raster order."""
    for index in itertools.product(*[range(n // patch) for n in spatial]):
        yield index, tuple(slice(i * patch, (i + 1) * patch) for i in index)


def _mask_spectrum_loop(spectrum: torch.Tensor, patch: int, generator: torch.Generator) -> torch.Tensor:
    spatial = tuple(spectrum.shape[1:])
    ratio = 0.5 + 0.25 * torch.rand((), generator=generator, device=spectrum.device)
    for index, region in _patch_regions(spatial, patch):
        first = [i * patch - n // 2 for i, n in zip(index, spatial)]
        if all(lo < patch and lo + patch - 1 > -patch for lo in first):
            continue  # protected core
        if torch.rand((), generator=generator, device=spectrum.device) < ratio:
            spectrum[(slice(None), *region)] = 0
    return spectrum


def _perturb_spectrum_loop(spectrum: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    device, spatial = spectrum.device, spectrum.shape[1:]
    scale = (5e-4 + 1e-4 * torch.randn((), generator=generator, device=device)).abs()
    radius = 0.15 + 0.1 * torch.rand((), generator=generator, device=device)
    grids = torch.meshgrid(*[torch.arange(n, device=device) - n // 2 for n in spatial], indexing="ij")
    window = torch.exp(-sum(k**2 / (2 * (radius * n) ** 2) for k, n in zip(grids, spatial)))
    window[tuple(n // 2 for n in spatial)] = 0
    noise = torch.randn(spectrum.shape, dtype=spectrum.dtype, generator=generator, device=device)
    return spectrum + scale * spectrum.abs().max() * window * noise


def spectral_patch_mask_loop(x, generator, config):
    return torch.stack([_real_inverse(_mask_spectrum_loop(_centred_fft(s), config.spectral_patch, generator)) for s in x])


def low_frequency_perturbation_loop(x, generator, config):
    return torch.stack([_real_inverse(_perturb_spectrum_loop(_centred_fft(s), generator)) for s in x])


def frequency_corruption_loop(x, generator, config):
    out = []
    for sample in x:
        spectrum = _mask_spectrum_loop(_centred_fft(sample), config.spectral_patch, generator)
        out.append(_real_inverse(_perturb_spectrum_loop(spectrum, generator)))
    return torch.stack(out)


def histogram_equalised_mask_loop(x, generator, config):
    out = x.clone()
    for i, sample in enumerate(x):
        ratio = 0.5 + 0.25 * torch.rand((), generator=generator, device=x.device)
        for _, region in _patch_regions(tuple(sample.shape[1:]), config.image_patch):
            if torch.rand((), generator=generator, device=x.device) < ratio:
                for c in range(sample.shape[0]):
                    values = sample[(c, *region)]
                    noise = torch.randn(values.shape, generator=generator, device=x.device)
                    out[(i, c, *region)] = values.mean() + values.std(correction=0) * noise
    return out


@functools.lru_cache(maxsize=4)
def _centred_highpass_filters(spatial: tuple[int, ...], device: torch.device) -> list[torch.Tensor]:
    """The official filters on the centred spectrum, built once as the official module does."""
    grids = torch.meshgrid(*[(torch.arange(n, device=device) - n // 2) * 512 / n for n in spatial], indexing="ij")
    distance_sq = sum(k**2 for k in grids)
    return [1 - torch.exp(-distance_sq / d0**2) for d0 in DEFAULT_CUTOFFS]


def highpass_filter_loop(x, generator, config):
    filters = _centred_highpass_filters(tuple(x.shape[2:]), x.device)
    return torch.stack([torch.stack([_real_inverse(_centred_fft(s) * h) for s in x]) for h in filters])


# ---------------------------------------------------------------- batched ops
def frepa_loss_step(x, generator, config):
    """Forward and backward of FrepaLoss on a prediction that requires grad."""
    pred = (0.9 * x).requires_grad_()
    FrepaLoss()(pred, x).backward()
    return pred.grad


def frepa_loss_step_loop(x, generator, config):
    """The official formulation: every filter re-transforms pred and target (full complex FFTs)."""
    pred = (0.9 * x).requires_grad_()
    loss = torch.sqrt(torch.mean((pred - x) ** 2))
    loss = loss + sum((torch.diff(pred, dim=a) - torch.diff(x, dim=a)).abs().mean() for a in range(2, x.ndim))
    axes = tuple(range(2, x.ndim))

    def highpass(image, h):
        spectrum = torch.fft.fftshift(torch.fft.fftn(image, dim=axes), dim=axes) * h
        return torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=axes), dim=axes).real

    for h in _centred_highpass_filters(tuple(x.shape[2:]), x.device):
        loss = loss + 0.2 * (highpass(pred, h) - highpass(x, h)).abs().mean()
    loss.backward()
    return pred.grad


def frepa_corruption(x, generator, config):
    """One corruption per sample as Frepa trains (its default grids); each op runs on its own samples."""
    return FrepaCorruption(spatial_dims=x.ndim - 2)(x, generator)


def frepa_corruption_loop(x, generator, config):
    out = []
    for sample in x:
        if torch.rand((), generator=generator, device=x.device) < 0.5:
            out.append(histogram_equalised_mask_loop(sample[None], generator, config)[0])
        else:
            out.append(frequency_corruption_loop(sample[None], generator, config)[0])
    return torch.stack(out)


BENCHMARKS: dict[str, OpBenchmark] = {
    "spectral_patch_mask": OpBenchmark(
        "zero random spectral patches outside the protected core",
        lambda x, g, c: spectral_patch_mask(x, c.spectral_patch, generator=g),
        spectral_patch_mask_loop,
    ),
    "low_frequency_perturbation": OpBenchmark(
        "Gaussian-windowed complex noise on the centred spectrum",
        lambda x, g, c: low_frequency_perturbation(x, generator=g),
        low_frequency_perturbation_loop,
    ),
    "frequency_corruption": OpBenchmark(
        "spectral patch mask + low-frequency perturbation on one FFT pair",
        lambda x, g, c: frequency_corruption(x, c.spectral_patch, generator=g),
        frequency_corruption_loop,
    ),
    "histogram_equalised_mask": OpBenchmark(
        "replace random image patches by noise with the patch's own mean/std",
        lambda x, g, c: histogram_equalised_mask(x, c.image_patch, generator=g),
        histogram_equalised_mask_loop,
    ),
    "frepa_corruption": OpBenchmark(
        "Frepa's per-sample choice of the two corruptions (FrepaCorruption: each op on its own samples)",
        frepa_corruption,
        frepa_corruption_loop,
    ),
    "highpass_filter": OpBenchmark(
        "the 5 Gaussian high-pass filters of L_HFL (rfftn bank vs per-sample, per-filter full FFTs)",
        lambda x, g, c: highpass_filter(x),
        highpass_filter_loop,
    ),
    "frepa_loss_fwd_bwd": OpBenchmark(
        "FrepaLoss forward + backward (reference: official formulation, FFT per filter and input)",
        frepa_loss_step,
        frepa_loss_step_loop,
    ),
}


# ---------------------------------------------------------------- timing
def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: OpFn, x: torch.Tensor, config: argparse.Namespace) -> float:
    """Median wall time of fn in ms, each run with a freshly seeded generator on x's device."""
    times = []
    for run in range(config.warmup + config.repeats):
        generator = torch.Generator(device=x.device).manual_seed(run)
        _synchronise(x.device)
        start = time.perf_counter()
        fn(x, generator, config)
        _synchronise(x.device)
        if run >= config.warmup:
            times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def pretraining_step_ms(x: torch.Tensor, config: argparse.Namespace) -> float:
    """Median ms of one Hi-End-MAE ViT-B/16 training step on x (the batch the corruption is timed on)."""
    if x.shape[1] != 1 or x.shape[2] % 16:
        raise ValueError(f"the ViT-B/16 step needs 1 channel and a multiple of 16 voxels, got {tuple(x.shape)}")
    torch.manual_seed(0)
    network = build("hiend_mae", {**PRESETS["paper"], "img": x.shape[2]}).to(x.device)
    step = make_step("hiend_mae", network, x)
    return median_ms(lambda *_: step(), x, config)


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        # Shared machines make CPU timings noisy; the load says how busy this one was.
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=96, help="edge of the cubic volumes")
    parser.add_argument("--spectral-patch", type=int, default=16, help="spectral patch edge (official: 16)")
    parser.add_argument("--image-patch", type=int, default=16, help="histogram-masking patch edge (ViT patch)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ops", nargs="*", choices=sorted(BENCHMARKS), help="subset of ops (default: all)")
    parser.add_argument("--no-loop", action="store_true", help="skip the per-sample references")
    parser.add_argument("--no-step", action="store_true", help="skip the ViT-B/16 pretraining-step reference")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/ops.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    config = parse_args(argv)
    device = torch.device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    shape = (config.batch, config.channels, *[config.size] * 3)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
    step_ms = None if config.no_step else pretraining_step_ms(x, config)
    if step_ms is not None:
        print(f"{'ViT-B/16 pretraining step':28s} {step_ms:10.1f} ms (Hi-End-MAE, fwd + bwd + AdamW)", flush=True)
    results = {}
    for name in config.ops or BENCHMARKS:
        bench = BENCHMARKS[name]
        entry = {"description": bench.description, "batched_ms": median_ms(bench.batched, x, config)}
        if bench.loop is not None and not config.no_loop:
            entry["loop_ms"] = median_ms(bench.loop, x, config)
            entry["speedup"] = entry["loop_ms"] / entry["batched_ms"]
        if step_ms is not None:
            entry["fraction_of_step"] = entry["batched_ms"] / step_ms
        results[name] = entry
        loop = f"{entry['loop_ms']:10.1f} ms loop  x{entry['speedup']:.1f}" if "loop_ms" in entry else ""
        share = f"  {100 * entry['fraction_of_step']:5.1f}% of a step" if step_ms is not None else ""
        print(f"{name:28s} {entry['batched_ms']:10.1f} ms batched {loop}{share}", flush=True)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine_info(device),
        "config": {
            "input_shape": list(shape),
            "spectral_patch": config.spectral_patch,
            "image_patch": config.image_patch,
            "warmup": config.warmup,
            "repeats": config.repeats,
            "statistic": "median wall-clock ms",
        },
        "vit_b16_step_ms": step_ms,
        "ops": results,
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {config.out}")
    return report


if __name__ == "__main__":
    main()
