"""Time medssl's batched masking, corruption and loss ops against plain per-sample Python-loop references.

    python bench/bench_ops.py --device cpu --out bench/results/ops.json          # 8 x 1 x 96^3
    python bench/bench_ops.py --batch 2 --size 64 --steps --out bench/results/ops_small.json   # quick check

Each op is timed as the median of ``--repeats`` runs after ``--warmup`` runs (CUDA is
synchronised around every run). On a CPU shared with other jobs, ``--threads 1`` gives far
steadier numbers than oversubscribed intra-op threads. A reference does what a straightforward port of the official
code does: one sample at a time, one patch at a time. The JSON holds the machine, the
configuration and, per op, the batched and reference medians in milliseconds.

Each op's time is also given as a share of ViT-B/16 pretraining steps on the same batch
(``--steps``): Hi-End-MAE's, the cheapest step of the collection (its encoder sees a quarter of
the tokens), for every op; and Frepa's ViT step, which runs the corruption, for Frepa's ops.

To add an op, write ``batched`` (and optionally ``loop``) functions taking (inputs, generator,
config), where inputs is the batch or what ``prepare`` makes of it, and put them in BENCHMARKS
under a new name.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
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
from medssl.masking import (
    TokenMask,
    block_masking,
    dual_masking,
    gather_tokens,
    patchify,
    random_masking,
    scatter_tokens,
    unpatchify,
)
from medssl.models.frepa import FrepaCorruption

from bench_pretrain_step import PRESETS, build, make_step  # bench/ is on sys.path when run as a script

OpFn = Callable[[object, torch.Generator, argparse.Namespace], object]
STEP_NETWORKS = ("hiend_mae", "frepa_vit")  # the ViT-B/16 pretraining steps the ops are set against
CHEAPEST_STEP = "hiend_mae"  # its encoder sees a quarter of the tokens: every op is set against it


@dataclass(frozen=True)
class OpBenchmark:
    """batched: the medssl op; loop: per-sample reference, or None when there is none.

    feeds: the pretraining networks whose training step runs the op (bench_pretrain_step's names;
        "frepa_baseline" is the Frepa bundle's masked-image-modelling baseline, which it does not time).
    prepare: makes the op's inputs from the batch, untimed (default: the batch itself).
    """

    description: str
    batched: OpFn
    loop: OpFn | None = None
    feeds: tuple[str, ...] = ("frepa_vit",)
    prepare: Callable[[torch.Tensor, argparse.Namespace], object] | None = None

    def inputs(self, x: torch.Tensor, config: argparse.Namespace) -> object:
        """What ``batched`` and ``loop`` take: the batch, or what ``prepare`` makes of it."""
        return self.prepare(x, config) if self.prepare else x


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


# ---------------------------------------------------------------- token masking
def _grid(x: torch.Tensor, patch: int) -> tuple[int, ...]:
    return tuple(n // patch for n in x.shape[2:])


def _keep_count(num_tokens: int, ratio: float) -> int:
    return round(num_tokens * (1.0 - ratio))


def patchify_loop(x, generator, config):
    """One patch at a time, flattened as (*patch, C) like patchify."""
    return torch.stack([
        torch.stack([sample[(slice(None), *region)].movedim(0, -1).reshape(-1)
                     for _, region in _patch_regions(tuple(x.shape[2:]), config.token_patch)])
        for sample in x
    ])


def unpatchify_loop(inputs, generator, config):
    tokens, shape = inputs
    out = torch.empty(shape, dtype=tokens.dtype, device=tokens.device)
    for i in range(shape[0]):
        for n, (_, region) in enumerate(_patch_regions(tuple(shape[2:]), config.token_patch)):
            patch = tokens[i, n].reshape(*[config.token_patch] * len(region), shape[1])
            out[(i, slice(None), *region)] = patch.movedim(-1, 0)
    return out


def _token_mask_loop(keep_ids: list[torch.Tensor], num_tokens: int) -> tuple[torch.Tensor, ...]:
    """ids_keep, ids_restore and mask of per-sample kept token ids, one sample at a time."""
    ids_keep, ids_restore, masks = [], [], []
    for kept in keep_ids:
        kept = torch.sort(kept).values
        mask = torch.ones(num_tokens, device=kept.device)
        mask[kept] = 0
        order = torch.cat([kept, torch.nonzero(mask).flatten()])
        ids_keep.append(kept)
        ids_restore.append(torch.argsort(order))
        masks.append(mask)
    return torch.stack(ids_keep), torch.stack(ids_restore), torch.stack(masks)


def random_masking_loop(x, generator, config):
    num_tokens = math.prod(_grid(x, config.token_patch))
    keep = _keep_count(num_tokens, config.mask_ratio)
    return _token_mask_loop(
        [torch.randperm(num_tokens, generator=generator, device=x.device)[:keep] for _ in range(x.shape[0])], num_tokens
    )


def block_masking_loop(x, generator, config):
    grid = _grid(x, config.token_patch)
    coarse = [g // config.mask_block for g in grid]
    keep = _keep_count(math.prod(coarse), config.mask_ratio)
    token_ids = torch.arange(math.prod(grid), device=x.device).reshape(grid)
    kept = []
    for _ in range(x.shape[0]):
        blocks = torch.randperm(math.prod(coarse), generator=generator, device=x.device)[:keep]
        ids = []
        for block in blocks.tolist():
            corner = [(block // math.prod(coarse[axis + 1:])) % coarse[axis] * config.mask_block
                      for axis in range(len(grid))]
            ids.append(token_ids[tuple(slice(c, c + config.mask_block) for c in corner)].flatten())
        kept.append(torch.cat(ids))
    return _token_mask_loop(kept, math.prod(grid))


def dual_masking_loop(x, generator, config):
    """MAESIL's dual mask one sample and one depth slab at a time (depth is the last grid axis)."""
    h, w, d = _grid(x, config.maesil_patch)
    plane_keep = _keep_count(h * w, config.plane_ratio)
    slab_keep = _keep_count(plane_keep, config.depth_ratio)
    kept = []
    for _ in range(x.shape[0]):
        positions = torch.randperm(h * w, generator=generator, device=x.device)[:plane_keep]
        ids = []
        for z in range(d):
            in_slab = positions[torch.randperm(plane_keep, generator=generator, device=x.device)[:slab_keep]]
            ids.append(in_slab * d + z)
        kept.append(torch.cat(ids))
    return _token_mask_loop(kept, h * w * d)


def _fixed_mask(x: torch.Tensor, config: argparse.Namespace) -> TokenMask:
    """One random token mask of the batch's ViT tokens, the same every run (the token ops' input)."""
    num_tokens = math.prod(_grid(x, config.token_patch))
    generator = torch.Generator(x.device).manual_seed(0)
    return random_masking(x.shape[0], num_tokens, config.mask_ratio, x.device, generator)


def _tokens_and_mask(x: torch.Tensor, config: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch tokens of x (the loss target Hi-End-MAE gathers) and a random token mask's ids_keep."""
    return patchify(x, config.token_patch), _fixed_mask(x, config).ids_keep


def _decoder_inputs(x: torch.Tensor, config: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """What Hi-End-MAE's decoder scatters: visible tokens of its width, ids_keep, ids_restore, the mask token."""
    mask = _fixed_mask(x, config)
    visible = torch.randn(x.shape[0], mask.ids_keep.shape[1], config.decoder_width, device=x.device)
    return visible, mask.ids_keep, mask.ids_restore, torch.randn(config.decoder_width, device=x.device)


def gather_tokens_loop(inputs, generator, config):
    tokens, ids_keep = inputs
    return torch.stack([sample[ids] for sample, ids in zip(tokens, ids_keep)])


def scatter_tokens_loop(inputs, generator, config):
    visible, ids_keep, ids_restore, mask_token = inputs
    out = []
    for sample, ids in zip(visible, ids_keep):
        tokens = mask_token.expand(ids_restore.shape[1], -1).clone()
        tokens[ids] = sample
        out.append(tokens)
    return torch.stack(out)


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


MAE_NETWORKS = ("hiend_mae", "maesil")
BENCHMARKS: dict[str, OpBenchmark] = {
    "patchify": OpBenchmark(
        "cut the batch into ViT patch tokens (the masked-loss target)",
        lambda x, g, c: patchify(x, c.token_patch),
        patchify_loop,
        feeds=MAE_NETWORKS,
    ),
    "unpatchify": OpBenchmark(
        "patch tokens back to volumes (reconstruction figures)",
        lambda inputs, g, c: unpatchify(inputs[0], c.token_patch, inputs[1][2:], inputs[1][1]),
        unpatchify_loop,
        feeds=MAE_NETWORKS,
        prepare=lambda x, c: (patchify(x, c.token_patch), tuple(x.shape)),
    ),
    "random_masking": OpBenchmark(
        "per-sample random token mask, exact visible count (Hi-End-MAE)",
        lambda x, g, c: random_masking(x.shape[0], math.prod(_grid(x, c.token_patch)), c.mask_ratio, x.device, g),
        random_masking_loop,
        feeds=("hiend_mae",),
    ),
    "block_masking": OpBenchmark(
        "random masking of blocks of mask-block^3 tokens (Frepa's masked-image-modelling baseline)",
        lambda x, g, c: block_masking(x.shape[0], _grid(x, c.token_patch), c.mask_ratio, c.mask_block, x.device, g),
        block_masking_loop,
        feeds=("frepa_baseline",),
    ),
    "dual_masking": OpBenchmark(
        "MAESIL's plane tubes then per-slab depth mask, on its 8^3-voxel token grid",
        lambda x, g, c: dual_masking(x.shape[0], _grid(x, c.maesil_patch), c.plane_ratio, c.depth_ratio, x.device, g),
        dual_masking_loop,
        feeds=("maesil",),
    ),
    "gather_tokens": OpBenchmark(
        "gather each sample's visible patch tokens",
        lambda inputs, g, c: gather_tokens(*inputs),
        gather_tokens_loop,
        feeds=MAE_NETWORKS,
        prepare=_tokens_and_mask,
    ),
    "scatter_tokens": OpBenchmark(
        "decoder tokens back in raster order, the mask token elsewhere",
        lambda inputs, g, c: scatter_tokens(inputs[0], inputs[2], inputs[3]),
        scatter_tokens_loop,
        feeds=MAE_NETWORKS,
        prepare=_decoder_inputs,
    ),
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


def median_ms(fn: OpFn, inputs: object, config: argparse.Namespace, device: torch.device) -> float:
    """Median wall time of fn(inputs) in ms, each run with a freshly seeded generator on ``device``."""
    times = []
    for run in range(config.warmup + config.repeats):
        generator = torch.Generator(device=device).manual_seed(run)
        _synchronise(device)
        start = time.perf_counter()
        fn(inputs, generator, config)
        _synchronise(device)
        if run >= config.warmup:
            times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def pretraining_step_ms(name: str, x: torch.Tensor, config: argparse.Namespace) -> float:
    """Median ms of one training step of the paper-size (ViT-B/16) network ``name`` on x, the batch the ops
    are timed on: Hi-End-MAE's masked encoder, or Frepa's dense ViT with its corruption, decoder and loss."""
    if x.shape[1] != 1 or x.shape[2] % 16:
        raise ValueError(f"the ViT-B/16 step needs 1 channel and a multiple of 16 voxels, got {tuple(x.shape)}")
    torch.manual_seed(0)
    network = build(name, {**PRESETS["paper"], "img": x.shape[2]}).to(x.device)
    step = make_step(name, network, x)
    milliseconds = median_ms(lambda *_: step(), x, config, x.device)
    del step, network  # the next step's network needs the memory
    return milliseconds


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
    parser.add_argument("--token-patch", type=int, default=16, help="ViT patch edge of the token ops (Hi-End-MAE: 16)")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--mask-block", type=int, default=2, help="block edge in tokens of block_masking")
    parser.add_argument("--maesil-patch", type=int, default=8, help="MAESIL's token edge (dual_masking's grid)")
    parser.add_argument("--plane-ratio", type=float, default=0.5, help="MAESIL's plane mask ratio")
    parser.add_argument("--depth-ratio", type=float, default=0.5, help="MAESIL's depth mask ratio")
    parser.add_argument("--decoder-width", type=int, default=384,
                        help="token width of scatter_tokens (Hi-End-MAE's decoder)")
    parser.add_argument("--steps", nargs="*", choices=STEP_NETWORKS, default=list(STEP_NETWORKS),
                        help="ViT-B/16 pretraining steps to time as references (none: --steps alone)")
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
    steps_ms = {}
    for name in config.steps:
        steps_ms[name] = pretraining_step_ms(name, x, config)
        print(f"{name + ' ViT-B/16 step':28s} {steps_ms[name]:10.1f} ms (fwd + bwd + AdamW)", flush=True)
    results = {}
    for name in config.ops or BENCHMARKS:
        bench = BENCHMARKS[name]
        inputs = bench.inputs(x, config)
        entry = {"description": bench.description, "feeds": list(bench.feeds),
                 "batched_ms": median_ms(bench.batched, inputs, config, device)}
        if bench.loop is not None and not config.no_loop:
            entry["loop_ms"] = median_ms(bench.loop, inputs, config, device)
            entry["speedup"] = entry["loop_ms"] / entry["batched_ms"]
        shares = {step: entry["batched_ms"] / ms for step, ms in steps_ms.items()
                  if step == CHEAPEST_STEP or step in bench.feeds}
        if shares:
            entry["fraction_of_step"] = shares
        results[name] = entry
        loop = f"{entry['loop_ms']:10.1f} ms loop  x{entry['speedup']:.1f}" if "loop_ms" in entry else ""
        share = "".join(f"  {100 * f:5.2f}% of {step}" for step, f in shares.items())
        print(f"{name:28s} {entry['batched_ms']:10.1f} ms batched {loop}{share}", flush=True)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine_info(device),
        "config": {
            "input_shape": list(shape),
            "spectral_patch": config.spectral_patch,
            "image_patch": config.image_patch,
            "token_patch": config.token_patch,
            "mask_ratio": config.mask_ratio,
            "mask_block": config.mask_block,
            "maesil_patch": config.maesil_patch,
            "plane_ratio": config.plane_ratio,
            "depth_ratio": config.depth_ratio,
            "decoder_width": config.decoder_width,
            "warmup": config.warmup,
            "repeats": config.repeats,
            "statistic": "median wall-clock ms",
        },
        "vit_b16_steps_ms": steps_ms,
        "ops": results,
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {config.out}")
    return report


if __name__ == "__main__":
    main()
