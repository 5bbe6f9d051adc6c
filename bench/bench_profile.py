"""Where a pretraining step's time goes: torch.profiler over the steps of bench_pretrain_step.py (issue #12).

The steps are bench_pretrain_step.py's (each bundle's network from its configs, a fixed batch,
the bundle's optimizer and clipping; MONAI's MaskedAutoEncoderViT as the reference where there
is one). After --warmup steps, --steps steps of each role run under torch.profiler, and every
operator's self time (CPU time on the calling thread, which includes waiting for its intra-op
threads; CUDA kernel time on a GPU) goes to one category:

- matmul: mm, addmm, bmm, baddbmm (the linear layers, forward and backward);
- attention: scaled_dot_product_attention's kernels, forward and backward;
- convolution, normalisation (layer, group, instance and batch norm), fft;
- optimizer: the fused AdamW step and the gradient clipping's norms and scaling;
- elementwise: activations, arithmetic and reductions;
- memory: copies, concatenation, indexing, gathers and scatters, fills, allocation;
- other: everything else (the autograd engine's own bookkeeping included).

Shares are of the summed self time, which is the step minus the Python between operators. The
GEMM work is what MFU counts, so ``1 - matmul - attention - convolution`` is the part of the step
that holds MFU down. The matrix products' own rate (their FLOPs from the recorded input shapes
over their self time) beside the square GEMM rate measured in the same run says how much the
shapes hold down (an MAE encoder multiplies only the visible tokens: 108 rows at batch 2 in the
paper preset).

    python bench/bench_profile.py --preset paper --networks hiend_mae --out bench/results/profile_paper.json
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections import defaultdict
from typing import Any, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from bench_pretrain_step import (  # bench/ is on sys.path
    NETWORKS, PRESETS, build_step, gemm_rate, machine_info, parse_run_arguments, step_report, write_report,
)

# Operator names without "aten::", leading and trailing "_" and a "_backward" suffix: exact names,
# then substrings, checked in this order (the first match wins).
MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "addmm_activation"}
ELEMENTWISE_OPS = {
    "gelu", "silu", "relu", "sigmoid", "softmax", "log_softmax", "softmax_backward_data", "log_softmax_backward_data",
    "tanh", "add", "sub", "rsub", "mul", "div", "pow", "sqrt", "rsqrt", "exp", "log", "abs", "neg", "where", "sum",
    "mean", "var", "std", "var_mean", "max", "min", "amax", "amin", "aminmax", "clamp", "clamp_min", "threshold",
    "dropout", "native_dropout", "bernoulli", "rand", "randn", "uniform", "normal", "erf", "sign", "lt", "gt", "eq",
    "ne", "le", "ge", "reciprocal", "lerp", "addcmul", "addcdiv", "mse_loss", "square", "logical_not", "bitwise_not",
    "prod", "cumsum",
}
MEMORY_OPS = {"to", "t", "detach", "alias", "unfold", "flatten", "roll", "flip", "repeat", "tile", "im2col", "col2im"}
SUBSTRING_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")),
    ("convolution", ("conv",)),
    ("normalisation", ("native_layer_norm", "native_group_norm", "batch_norm", "instance_norm")),
    ("fft", ("fft",)),
    ("optimizer", ("adam", "foreach", "clip_grad", "vector_norm")),
    ("memory", ("copy", "cat", "index", "gather", "scatter", "fill", "zero", "empty", "clone", "contiguous", "stack",
                "pad", "select", "slice", "view", "reshape", "permute", "transpose", "squeeze", "expand",
                "as_strided", "unbind", "split", "narrow", "resize", "upsample", "interpolate")),
)
CATEGORY_NAMES = ["matmul", "attention", "convolution", "normalisation", "fft", "optimizer", "elementwise", "memory",
                  "other"]
TOP_OPS = 10


def category(op: str) -> str:
    """The category of the operator named ``op`` (e.g. ``aten::addmm``, ``aten::gelu_backward``)."""
    base = op.removeprefix("aten::").strip("_").removesuffix("_backward")
    if base in MATMUL_OPS:
        return "matmul"
    for label, patterns in SUBSTRING_CATEGORIES:
        if any(pattern in base for pattern in patterns):
            return label
    if base in ELEMENTWISE_OPS:
        return "elementwise"
    if base in MEMORY_OPS:
        return "memory"
    return "other"


def matmul_flops(op: str, shapes: Sequence[Sequence[int]]) -> int:
    """FLOPs of one call of the matrix product ``op`` (a :data:`MATMUL_OPS` operator) on inputs of ``shapes``."""
    *batch, rows, inner = shapes[-2]  # addmm and baddbmm take the bias first
    return 2 * math.prod(batch) * rows * inner * shapes[-1][-1]


def profile_step(step, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Self time per category, the matrix products' FLOP rate and the top operators of ``steps`` calls of ``step``."""
    for _ in range(warmup):
        step()
    use_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if use_cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - started
    op_ms: dict[str, float] = defaultdict(float)  # self time per step, by operator
    op_calls: dict[str, float] = defaultdict(float)
    product_flops = product_ms = 0.0
    for event in prof.key_averages(group_by_input_shape=True):  # one entry per operator and input shapes
        if event.key.startswith("ProfilerStep"):
            continue
        ms = (event.self_device_time_total if use_cuda else event.self_cpu_time_total) / 1e3 / steps
        op_ms[event.key] += ms
        op_calls[event.key] += event.count / steps
        if category(event.key) == "matmul":
            product_flops += matmul_flops(event.key, [shape for shape in event.input_shapes if shape]) * event.count
            product_ms += ms
    ops = sorted(((name, ms, op_calls[name]) for name, ms in op_ms.items() if ms > 0), key=lambda op: op[1],
                 reverse=True)
    total = sum(ms for _, ms, _ in ops)
    by_category: dict[str, float] = defaultdict(float)
    for name, ms, _ in ops:
        by_category[category(name)] += ms
    return {
        "profiled_step_s": wall / steps,
        "self_ms_per_step": total,
        "matmul_gflop_per_step": product_flops / steps / 1e9,
        "matmul_gflop_s": product_flops / steps / product_ms / 1e6 if product_ms else None,
        "categories": {name: {"ms_per_step": by_category[name], "share": by_category[name] / total}
                       for name in CATEGORY_NAMES},
        "top_ops": [{"op": name, "category": category(name), "ms_per_step": ms, "share": ms / total,
                     "calls_per_step": calls} for name, ms, calls in ops[:TOP_OPS]],
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--networks", nargs="+", choices=sorted(NETWORKS), default=["hiend_mae"])
    parser.add_argument("--batch", type=int, default=2, help="crops per step")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per network and role")
    parser.add_argument("--warmup", type=int, default=2)
    return parse_run_arguments(parser, argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    machine = machine_info(device, args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the steps' (autocast on CUDA)
    gemm = gemm_rate(device, dtype)
    networks = {}
    for name in args.networks:
        roles = ["ours"] + (["reference"] if NETWORKS[name].reference is not None else [])
        entry = networks[name] = {"input_shape": None}
        for role in roles:
            step = build_step(name, role, PRESETS[args.preset], args.batch, device)
            entry["input_shape"] = list(step.image.shape)
            entry[role] = {"network": type(step.network).__name__,
                           **profile_step(step, args.steps, args.warmup, device)}
            shares = entry[role]["categories"]
            print(f"{name:11s} {role:9s} " + "  ".join(f"{label} {100 * shares[label]['share']:.1f}%"
                                                       for label in CATEGORY_NAMES), flush=True)
            del step
    machine["load_average_at_end"] = os.getloadavg()
    report = {
        **step_report("profile", argv, machine, args),
        "time": "CUDA kernel self time" if device.type == "cuda" else "CPU self time on the calling thread",
        "gemm_gflop_s": gemm / 1e9,
        "gemm_dtype": str(dtype).removeprefix("torch."),
        "networks": networks,
    }
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
