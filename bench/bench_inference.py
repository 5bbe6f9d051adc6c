"""Sliding-window inference time and peak memory of seg_finetune's network on one CT-sized scan.

The network and the sliding-window inferer are built by MONAI's ConfigParser from
bundles/seg_finetune/configs/inference.json (preset "paper": UNETR with a ViT-B/16 encoder,
roi 96^3, sw_batch_size 4, overlap 0.5, Gaussian blending), merged with demo.json for "demo".
The scan is a seeded random volume of --shape (default 256 x 256 x 160, a typical abdominal CT
after resampling to 1.5 mm): the work does not depend on the voxel values. Measured:
- the median wall time of the whole sliding-window pass (windows, network, blending) over
  --repeats runs after --warmup, without gradients, in the bundle's precision for ``--amp``
  (default: on with CUDA, as the bundle): float16 autocast on CUDA as its evaluator runs it,
  bfloat16 autocast on the CPU (its inferer, medssl.engine.CPUAutocastInferer), else float32;
- the windows per pass, counted at the network's input;
- FLOPs of a pass (torch's FlopCounterMode on one window, times the windows; blending not
  counted) and their rate against the GEMM rate measured in the same run: bf16 on CUDA and for
  amp on the CPU, fp32 otherwise;
- peak memory: this process's peak RSS on CPU (it runs nothing else), max allocated on CUDA.

    python bench/bench_inference.py --preset paper --out bench/results/inference_paper.json
    python bench/bench_inference.py --preset paper --amp --out bench/results/inference_paper_amp.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Sequence

import torch
import torch.nn as nn
from monai.bundle import ConfigParser
from torch.utils.flop_counter import FlopCounterMode

from bench_pretrain_step import bundle_config, gemm_rate, parse_run_arguments, peak_rss_bytes, write_report  # bench/ is on sys.path when run as a script

PRESETS = {"paper": ("inference.json",), "demo": ("inference.json", "demo.json")}


class WindowCounter(nn.Module):
    """Passes its input to ``network`` and counts the windows (batch entries) it has seen."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.windows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return self.network(x)


def seg_finetune_config(preset: str, device: torch.device, amp: bool) -> ConfigParser:
    return bundle_config("seg_finetune", {"configs": PRESETS[preset]}, {"device": f"$torch.device('{device}')", "amp": amp})


def window_flops(network: nn.Module, roi_size: Sequence[int], device: torch.device) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        network(torch.zeros(1, 1, *roi_size, device=device))
    return counter.get_total_flops()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 160), help="scan size in voxels")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="the bundle's amp (default: on with CUDA, as the bundle)")
    return parse_run_arguments(parser, argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    amp = device.type == "cuda" if args.amp is None else args.amp
    load_at_start = os.getloadavg()
    before_build = peak_rss_bytes()
    parser = seg_finetune_config(args.preset, device, amp)
    torch.manual_seed(0)
    network = WindowCounter(parser.get_parsed_content("network").eval())
    inferer = parser.get_parsed_content("inferer")
    roi_size = parser.get_parsed_content("roi_size")
    scan = torch.rand(1, 1, *args.shape, generator=torch.Generator().manual_seed(0)).to(device)

    def run() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=amp and device.type == "cuda"):
            inferer(scan, network)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for index in range(args.warmup + args.repeats):
        network.windows = 0
        start = time.perf_counter()
        run()
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
        print(f"run {index}: {time.perf_counter() - start:.2f} s, {network.windows} windows", flush=True)
    windows = network.windows
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    flops = window_flops(network.network, roi_size, device) * windows
    gemm = gemm_rate(device, torch.bfloat16 if amp or device.type == "cuda" else torch.float32)
    median = statistics.median(times)
    result = {
        "network": type(network.network).__name__,
        "encoder_size": parser.get_parsed_content("encoder_size"),
        "roi_size": roi_size,
        "sw_batch_size": parser.get_parsed_content("sw_batch_size"),
        "overlap": parser.get_parsed_content("sw_overlap"),
        "mode": parser.get_parsed_content("inferer#inferer#mode"),
        "scan_shape": list(args.shape),
        "windows": windows,
        "seconds_median": median,
        "seconds": times,
        "scans_per_s": 1 / median,
        "gflop": flops / 1e9,
        "achieved_gflop_s": flops / median / 1e9,
        "fraction_of_gemm": flops / median / gemm,
        "peak_memory": {
            "kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM) of this process",
            "peak_bytes": peak,
            "before_build_bytes": None if device.type == "cuda" else before_build,
        },
    }
    report = {
        "benchmark": "inference",
        "command": " ".join(["python bench/bench_inference.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
        },
        "preset": args.preset,
        "configs": list(PRESETS[args.preset]),
        "dtype": ("float16 autocast" if device.type == "cuda" else "bfloat16 autocast") if amp else "float32",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "gemm_gflop_s": gemm / 1e9,
        "result": result,
    }
    print(f"{result['network']} ({result['encoder_size']}) on {tuple(args.shape)}: {median:.2f} s per scan, "
          f"{windows} windows of {tuple(roi_size)}, {result['gflop']:.0f} GFLOP, peak {peak / 2**20:.0f} MiB")
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
