"""Pretraining-step benchmark: our Hi-End-MAE beside MONAI's MaskedAutoEncoderViT.

Per network: median training-step time (forward + backward + AdamW) after warm-up, alternating
the networks step by step in one process so both see the same machine state; FLOPs of a step
(torch's FlopCounterMode, with CPU scaled_dot_product_attention mapped to torch's SDPA
formulas, which it otherwise counts as zero); achieved FLOP/s divided by the fp32 GEMM rate
measured in the same run (model FLOPs utilisation); peak memory (RSS of a fresh child process on
CPU, max allocated on GPU).

    python bench/bench_pretrain_step.py --preset paper --out bench/results/pretrain_step_paper.json
    python bench/bench_pretrain_step.py --preset demo --out bench/results/pretrain_step_demo.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from monai.networks.nets import MaskedAutoEncoderViT
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from medssl.losses import masked_mse
from medssl.masking import patchify
from medssl.models.hiend_mae import HiEndMAE

PRESETS = {
    # ViT-B/16 at 96^3, decoder 384 wide (Hi-End-MAE base; MONAI's MAE with 4 decoder blocks).
    "paper": dict(img=96, encoder="base", width=768, mlp=3072, heads=12, decoder=384, decoder_heads=12),
    "demo": dict(img=64, encoder="tiny", width=192, mlp=768, heads=3, decoder=192, decoder_heads=6),
}


def build(name: str, preset: dict) -> torch.nn.Module:
    if name == "hiend_mae":
        return HiEndMAE(img_size=preset["img"], encoder_size=preset["encoder"],
                        decoder_hidden_size=preset["decoder"], decoder_num_heads=preset["decoder_heads"])
    return MaskedAutoEncoderViT(
        1, preset["img"], 16, hidden_size=preset["width"], mlp_dim=preset["mlp"], num_heads=preset["heads"],
        masking_ratio=0.75, decoder_hidden_size=preset["decoder"], decoder_mlp_dim=4 * preset["decoder"],
        decoder_num_layers=4, decoder_num_heads=preset["decoder_heads"], qkv_bias=True,
    )


def loss_of(name: str, network: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    if name == "hiend_mae":
        return network(image)["loss"]
    pred, mask = network(image)
    return masked_mse(pred, patchify(image, 16), mask, norm_pix=True)


def make_step(name: str, network: torch.nn.Module, image: torch.Tensor):
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=image.device.type == "cuda"):
            loss = loss_of(name, network, image)
        loss.backward()
        optimizer.step()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(name: str, network: torch.nn.Module, image: torch.Tensor) -> int:
    aten = torch.ops.aten
    cpu_sdpa = {  # same argument order as the generic SDPA ops that torch has formulas for
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *_, **__: sdpa_backward_flop_count(grad, q, k, v),
    }
    counter = FlopCounterMode(display=False, custom_mapping=cpu_sdpa)
    with counter:
        loss_of(name, network, image).backward()
    network.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def gemm_rate(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    for _ in range(2):
        a @ b
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def _peak_rss_child(name: str, preset: dict, batch: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    network = build(name, preset)
    step = make_step(name, network, torch.rand(batch, 1, *(preset["img"],) * 3))
    for _ in range(2):
        step()
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def peak_memory(name: str, preset: dict, batch: int, device: torch.device, threads: int) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        network = build(name, preset).to(device)
        step = make_step(name, network, torch.rand(batch, 1, *(preset["img"],) * 3, device=device))
        for _ in range(2):
            step()
        return torch.cuda.max_memory_allocated(device)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_peak_rss_child, args=(name, preset, batch, threads, queue))
    child.start()
    value = queue.get()
    child.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    image = torch.rand(args.batch, 1, *(preset["img"],) * 3, device=device)
    names = ["hiend_mae", "monai_mae"]

    torch.manual_seed(0)
    networks = {name: build(name, preset).to(device) for name in names}
    flops = {name: step_flops(name, networks[name], image) for name in names}
    steps = {name: make_step(name, networks[name], image) for name in names}
    for _ in range(args.warmup):
        for name in names:
            steps[name]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.steps):
        for name in names:  # alternate, so both see the same machine state
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    rate = gemm_rate(device)

    results = {}
    for name in names:
        median = statistics.median(times[name])
        results[name] = {
            "step_s_median": median,
            "samples_per_s": args.batch / median,
            "step_gflop": flops[name] / 1e9,
            "achieved_gflop_s": flops[name] / median / 1e9,
            "mfu_vs_gemm": flops[name] / median / rate,
            "peak_memory_bytes": peak_memory(name, preset, args.batch, device, args.threads),
        }
    report = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": {"cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or platform.machine(), "load_average": os.getloadavg()},
        "preset": args.preset, "batch": args.batch, "mask_ratio": 0.75,
        "gemm_gflop_s": rate / 1e9,
        "networks": results,
        "time_ratio_hiend_over_monai": results["hiend_mae"]["step_s_median"] / results["monai_mae"]["step_s_median"],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
