"""Memory and speed of MAESIL on one 128^3 superpatch at the paper's size.

Measures, each in a fresh subprocess so that peaks do not mix:
- ``train_step``: dual-masked forward (1024 of 4096 tokens visible) + backward + AdamW step;
- ``reconstruct``: unmasked evaluation forward (all 4096 tokens through the encoder), no grad.
On CPU the peak is the process's peak resident set size (ru_maxrss) and its growth over the
idle process with the model and optimiser built; on CUDA it is torch.cuda.max_memory_allocated.
It also counts the calls to torch.nn.functional.scaled_dot_product_attention per step, to show
that every attention block goes through it.

    python bench/bench_maesil.py                       # CPU, writes bench/results/maesil.json
    python bench/bench_maesil.py --device cuda --out bench/results/maesil_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# the bundle's train.json network (MAESIL's defaults): ViT width 768, 6 blocks, 8 heads, patch 8
DEFAULTS = {
    "superpatch_size": 128,
    "patch_size": 8,
    "encoder_size": "base",
    "encoder_layers": 6,
    "encoder_heads": 8,
    "decoder_hidden_size": 384,
    "decoder_layers": 3,
    "decoder_heads": 8,
}


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, device: str, steps: int, batch_size: int, amp: bool) -> dict:
    from medssl.models.maesil import MAESIL

    torch.manual_seed(0)
    model = MAESIL(**DEFAULTS).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    image = torch.rand(batch_size, 1, 128, 128, 128, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    attention_calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        query = kwargs.get("query", args[0] if args else None)
        attention_calls.append(tuple(query.shape))
        return original(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = counting

    def step() -> None:
        if mode == "train_step":
            model.train()
            with torch.autocast(device, dtype=torch.float16, enabled=amp):
                loss = model(image, generator=generator)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        else:
            model.eval()
            with torch.no_grad(), torch.autocast(device, dtype=torch.float16, enabled=amp):
                model.reconstruct(image)

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        base = peak_rss_mib()
    times = []
    for index in range(steps + 1):  # the first step warms up (allocations, optimizer state)
        attention_calls.clear()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if index:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()
    return {
        "mode": mode,
        "batch_size": batch_size,
        "amp_float16": amp,
        "step_seconds_median": statistics.median(times),
        "step_seconds": times,
        "memory_kind": "cuda max_memory_allocated" if device == "cuda" else "peak RSS (ru_maxrss)",
        "peak_memory_mib": round(peak, 1),
        "memory_before_first_step_mib": round(base, 1),
        "sdpa_calls_per_step": len(attention_calls),
        "sdpa_query_shapes": sorted(set(attention_calls)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "encoder_parameters": sum(p.numel() for p in model.encoder.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--amp", action="store_true", help="float16 autocast, as the bundle trains on GPU")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "maesil.json"))
    parser.add_argument("--worker", choices=["train_step", "reconstruct"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(measure(args.worker, args.device, args.steps, args.batch_size, args.amp)))
        return

    results = []
    for mode in ("train_step", "reconstruct"):
        command = [sys.executable, __file__, "--worker", mode, "--device", args.device, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size)] + (["--amp"] if args.amp else [])
        completed = subprocess.run(command, check=True, capture_output=True, text=True)
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
        print(f"{mode}: {results[-1]['step_seconds_median']:.2f} s/step, peak {results[-1]['peak_memory_mib']:.0f} MiB "
              f"({results[-1]['memory_kind']}), {results[-1]['sdpa_calls_per_step']} SDPA calls")
    machine = {
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "os_cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "torch": torch.__version__,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }
    report = {
        "command": " ".join(["python bench/bench_maesil.py", *sys.argv[1:]]),
        "machine": machine,
        "config": DEFAULTS | {"tokens": 4096, "visible_tokens": 1024},
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
