"""Fine-tuning step of seg_finetune's networks in float32 and with the bundle's amp, alternating.

Everything a step uses is built by MONAI's ConfigParser from bundles/seg_finetune/configs
(preset "demo": train.json + demo.json, the study's small preset; "paper": train.json) with
``network_kind`` set to each of --networks, once with ``amp`` false and once true, from the same
seed: ``network`` (from scratch), ``loss`` (DiceCE), ``optimizer`` (fused AdamW) and
``train#inferer``. On the CPU the bundle's amp is bfloat16 autocast (medssl.engine.CPUAutocastInferer);
on CUDA it is MONAI's float16 autocast, which this script applies around the inferer as the
trainer does (without the gradient scaler). A step is what SupervisedTrainer does per iteration:
inferer, loss, backward, optimiser step, on one case's ``num_samples`` crops of random intensities
and random labels (the work does not depend on the values). Measured per network:

- the median step time of each precision over --steps steps after --warmup, the two precisions
  alternating step by step in one process so that both see the same machine state;
- FLOPs of one float32 forward + backward (torch's FlopCounterMode: convolutions and matrix
  products; normalisation and elementwise ops count 0) and their rate against the GEMM rate
  measured in the same run, float32 GEMM for the float32 step and bfloat16 GEMM for amp.

    python bench/bench_finetune_step.py --preset demo --out bench/results/finetune_step_demo.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from bench_pretrain_step import (  # bench/ is on sys.path
    PRESETS, bundle_config, gemm_rate, machine_info, parse_run_arguments, time_alternating, write_report,
)

NETWORK_KINDS = ("vit", "swin", "cnn")


@dataclass
class FineTuningStep:
    """One SupervisedTrainer iteration of seg_finetune's parsed pieces on a fixed batch."""

    network: nn.Module
    loss_function: nn.Module
    optimizer: torch.optim.Optimizer
    inferer: object
    cuda_amp: bool
    image: torch.Tensor
    label: torch.Tensor

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.cuda_amp):
            loss = self.loss_function(self.inferer(self.image, self.network), self.label)
        loss.backward()
        self.optimizer.step()

    def flops(self) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            self.loss_function(self.network(self.image), self.label).backward()
        self.network.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def build_step(preset: str, kind: str, amp: bool, device: torch.device) -> FineTuningStep:
    """seg_finetune's pieces for ``kind`` with ``amp``, the network at seed 0, and a seeded batch."""
    parser = bundle_config("seg_finetune", PRESETS[preset],
                           {"network_kind": kind, "amp": amp, "device": f"$torch.device('{device}')"})
    torch.manual_seed(0)
    network = parser.get_parsed_content("network")
    crops = (parser.get_parsed_content("num_samples"), 1, *parser.get_parsed_content("roi_size"))
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(crops, generator=generator).to(device)
    label = torch.randint(0, parser.get_parsed_content("out_channels"), crops, generator=generator).to(device)
    return FineTuningStep(network, parser.get_parsed_content("loss"), parser.get_parsed_content("optimizer"),
                          parser.get_parsed_content("train#inferer"), parser.get_parsed_content("cuda_amp"),
                          image, label)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--networks", nargs="+", choices=NETWORK_KINDS, default=list(NETWORK_KINDS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per precision")
    parser.add_argument("--warmup", type=int, default=1)
    return parse_run_arguments(parser, argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    machine = machine_info(device, args.threads)
    gemm = {"float32": gemm_rate(device, torch.float32), "amp": gemm_rate(device, amp_dtype)}
    print(f"GEMM {gemm['float32'] / 1e9:.1f} GFLOP/s float32, {gemm['amp'] / 1e9:.1f} GFLOP/s {str(amp_dtype).removeprefix('torch.')}", flush=True)
    networks = {}
    for kind in args.networks:
        steps = {"float32": build_step(args.preset, kind, False, device), "amp": build_step(args.preset, kind, True, device)}
        flops = steps["float32"].flops()
        times = time_alternating(steps, args.warmup, args.steps, device)
        entry = {"network": type(steps["float32"].network).__name__, "batch": list(steps["float32"].image.shape),
                 "gflop": flops / 1e9}
        for precision, measured in times.items():
            median = statistics.median(measured)
            entry[precision] = {"seconds_median": median, "seconds": measured, "achieved_gflop_s": flops / median / 1e9,
                                "fraction_of_gemm": flops / median / gemm[precision]}
        entry["speedup"] = entry["float32"]["seconds_median"] / entry["amp"]["seconds_median"]
        networks[kind] = entry
        print(f"{kind} ({entry['network']}): float32 {entry['float32']['seconds_median']:.2f} s, amp "
              f"{entry['amp']['seconds_median']:.2f} s per step ({entry['speedup']:.2f}x)", flush=True)
    machine["load_average_at_end"] = os.getloadavg()
    report = {
        "benchmark": "finetune_step",
        "command": " ".join(["python bench/bench_finetune_step.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine,
        "preset": args.preset,
        "configs": list(PRESETS[args.preset]["configs"]),
        "amp_dtype": str(amp_dtype).removeprefix("torch."),
        "warmup": args.warmup,
        "steps": args.steps,
        "gemm_gflop_s": {precision: rate / 1e9 for precision, rate in gemm.items()},
        "networks": networks,
    }
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
