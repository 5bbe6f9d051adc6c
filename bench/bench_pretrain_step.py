"""Pretraining-step benchmark of every pretraining bundle's network, beside MONAI's MaskedAutoEncoderViT.

Each network is built by MONAI's ConfigParser from its bundle's configs, so the benchmark follows
the bundles: preset "paper" reads configs/train.json, "demo" train.json + demo.json (NETWORKS):

- hiend_mae: Hi-End-MAE (ViT-B/16 at 96^3 in the paper preset). Reference: MONAI's MAE with the
  same encoder, patch, mask ratio, decoder width and heads, and MONAI's 4 decoder blocks.
  With --official-hiend-mae CHECKOUT (paper preset), the official implementation
  (github.com/FengheTan9/Hi-End-MAE, at its ViT-B/16 96^3 config, which the bundle's paper config
  matches) is timed in the same alternation, from a checkout outside this repository; it needs
  the timm it pins (0.5.4), which imports torchvision, so the process needs a torch that PyPI's
  torchvision imports beside, e.g. a venv of its own: pip install "torch===2.13.0"
  torchvision==0.28.0 timm==0.5.4 -e . (PyPI's default torch build, on the CPU too).
- maesil: MAESIL on one superpatch (128^3, patch 8: 4096 tokens, the dual mask keeps 1024).
  Reference: MONAI's MAE at the same token count, patch, encoder and decoder; it masks tokens at
  random with the ratio that keeps the same number visible, (1 - plane) * (1 - depth).
- frepa_vit / frepa_swin / frepa_cnn: Frepa's restoration network with each encoder at 96^3:
  corruption, dense encoding of the corrupted batch and of both frequency views (embedding
  consistency), convolutional decoder, FrepaLoss. MONAI has no such network: no reference, no ratio.

A training step is what the bundle's trainer does per iteration on a fixed batch of --batch
crops: forward (bf16 autocast on CUDA), backward, gradient clipping where the bundle clips
(MAESIL), and the bundle's optimizer step. Measured per network:
- median step time after warm-up, ours, the reference (and the official code) alternating step by
  step in one process so that all see the same machine state; samples/s = batch / median;
- FLOPs of one forward + backward (torch's FlopCounterMode, which counts matrix products,
  convolutions and attention only: FFTs, normalisations, interpolation and elementwise ops count
  0, so Frepa's FFT-based corruption and loss add time but no FLOPs; CPU
  scaled_dot_product_attention, which it counts as 0, is mapped to torch's SDPA formulas);
- model FLOPs utilisation: achieved FLOP/s over the GEMM rate measured in the same run, in the
  step's dtype (fp32 on CPU, bf16 on CUDA), and over --peak-tflops when given;
- peak memory of a fresh child process that builds the network and runs two steps: its peak RSS
  on CPU, torch.cuda.max_memory_allocated on CUDA.

    python bench/bench_pretrain_step.py --preset paper --out bench/results/pretrain_step_paper.json
    python bench/bench_pretrain_step.py --preset demo --networks hiend_mae maesil --steps 3
    python bench/bench_pretrain_step.py --preset paper --networks hiend_mae --official-hiend-mae ../Hi-End-MAE
    python bench/bench_pretrain_step.py --device cuda --compile --peak-tflops 989 \
        --out bench/results/pretrain_step_paper_cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from monai.bundle import ConfigParser
from monai.networks.nets import MaskedAutoEncoderViT
from monai.utils.module import instantiate
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from medssl.encoders import ENCODER_SIZES
from medssl.losses import masked_mse
from medssl.masking import patchify

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"

# Which bundle configs make a preset, merged in order. A preset may also carry "img", a crop edge
# replacing the bundle's (bench_ops.py times its ViT-B/16 step at the size of its own batch).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"configs": ("train.json",)},
    "demo": {"configs": ("train.json", "demo.json")},
}


def bundle_config(bundle: str, preset: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> ConfigParser:
    """The bundle's configs of ``preset`` merged, then ``overrides`` (config id -> value) applied."""
    files = [BUNDLES / bundle / "configs" / name for name in preset["configs"]]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"bundle config {missing} not found: run the benchmark from a checkout with bundles/")
    parser = ConfigParser()
    parser.read_config([str(path) for path in files])
    parser.update(dict(overrides or {}))
    return parser


def _vit_settings(parser: ConfigParser, overrides: Mapping[str, str]) -> dict[str, Any]:
    """The bundle's ViT preset with its config overrides (encoder setting -> config id)."""
    settings = dict(ENCODER_SIZES["vit"][parser.get_parsed_content("encoder_size")])
    settings.update({key: parser.get_parsed_content(config_id) for key, config_id in overrides.items()})
    return settings


def _monai_mae(vit: Mapping[str, Any], img_size: Sequence[int], decoder: Mapping[str, int], mask_ratio: float):
    return MaskedAutoEncoderViT(
        1,
        img_size,
        vit["patch_size"],
        hidden_size=vit["hidden_size"],
        mlp_dim=vit["mlp_dim"],
        num_layers=vit["num_layers"],
        num_heads=vit["num_heads"],
        masking_ratio=mask_ratio,
        decoder_hidden_size=decoder["hidden_size"],
        decoder_mlp_dim=4 * decoder["hidden_size"],  # both methods' decoders have MLP ratio 4
        decoder_num_layers=decoder["num_layers"],
        decoder_num_heads=decoder["num_heads"],
        qkv_bias=True,
    )


def hiend_mae_reference(parser: ConfigParser) -> MaskedAutoEncoderViT:
    """MONAI's MAE at Hi-End-MAE's encoder size, patch, mask ratio and decoder width (4 decoder blocks)."""
    decoder = {
        "hidden_size": parser.get_parsed_content("decoder_hidden_size"),
        "num_layers": 4,
        "num_heads": parser.get_parsed_content("decoder_num_heads"),
    }
    return _monai_mae(
        _vit_settings(parser, {}),
        parser.get_parsed_content("roi_size"),
        decoder,
        parser.get_parsed_content("mask_ratio"),
    )


def maesil_reference(parser: ConfigParser) -> MaskedAutoEncoderViT:
    """MONAI's MAE at MAESIL's token grid, encoder and decoder, keeping as many tokens as the dual mask."""
    vit = _vit_settings(
        parser, {"patch_size": "patch_size", "num_layers": "encoder_layers", "num_heads": "encoder_heads"}
    )
    decoder = {
        "hidden_size": parser.get_parsed_content("decoder_hidden_size"),
        "num_layers": parser.get_parsed_content("decoder_layers"),
        "num_heads": parser.get_parsed_content("decoder_heads"),
    }
    kept = (1 - parser.get_parsed_content("plane_mask_ratio")) * (1 - parser.get_parsed_content("depth_mask_ratio"))
    return _monai_mae(vit, parser.get_parsed_content("superpatch_size"), decoder, 1 - kept)


# The official code's one ViT-B/16 configuration (hi_end_mae.build_vit_base_hi_end_mae_p16_3d).
OFFICIAL_HIEND_MAE_CONFIG = {"roi_size": [96, 96, 96], "encoder_size": "base", "decoder_hidden_size": 384,
                             "decoder_num_heads": 12}


def official_hiend_mae(parser: ConfigParser, checkout: Path) -> nn.Module:
    """The official Hi-End-MAE from a checkout of github.com/FengheTan9/Hi-End-MAE, at the bundle's mask ratio.

    Its forward takes the (B, 1, 96, 96, 96) image and returns the loss. The bundle's config must be
    the official one (OFFICIAL_HIEND_MAE_CONFIG): the paper preset is.
    """
    found = {key: parser.get_parsed_content(key) for key in OFFICIAL_HIEND_MAE_CONFIG}
    if found != OFFICIAL_HIEND_MAE_CONFIG:
        raise ValueError(f"the official Hi-End-MAE exists at {OFFICIAL_HIEND_MAE_CONFIG} only, the bundle's config "
                         f"gives {found}: time it with --preset paper")
    if not (checkout / "hi_end_mae.py").is_file():
        raise FileNotFoundError(f"{checkout / 'hi_end_mae.py'} not found: --official-hiend-mae takes a checkout of "
                                "github.com/FengheTan9/Hi-End-MAE")
    if str(checkout.resolve()) not in sys.path:
        sys.path.insert(0, str(checkout.resolve()))
    from hi_end_mae import build_vit_base_hi_end_mae_p16_3d

    settings = argparse.Namespace(img_size=96, patch_size=16, in_chans=1, pos_embed_type="sincos",
                                  mask_ratio=parser.get_parsed_content("mask_ratio"))
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the whole model
        return build_vit_base_hi_end_mae_p16_3d(settings)


def official_provenance(checkout: Path) -> dict[str, str | None]:
    """Which official code ran: the checkout, its git commit (None outside git) and the timm it used."""
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    return {"checkout": str(checkout), "commit": commit.stdout.strip() if commit.returncode == 0 else None,
            "timm": importlib.metadata.version("timm")}


def _no_inputs(image: torch.Tensor) -> dict[str, torch.Tensor]:
    return {}


def _all_valid(image: torch.Tensor) -> dict[str, torch.Tensor]:
    """MAESIL's trainer also passes the crop's valid mask (1 on real voxels, here every voxel)."""
    return {"valid": torch.ones_like(image)}


@dataclass(frozen=True)
class NetworkSpec:
    """A bundle's pretraining network and, where MONAI has one, the reference network at its size.

    bundle: folder under bundles/. crop_id: config id of the crop the network takes.
    overrides: config id -> value applied after the preset's configs.
    reference: builds MONAI's counterpart from the parsed config (None: no reference).
    official: builds the official implementation from the parsed config and a checkout of it
        (None: not benchmarked).
    inputs: extra keyword inputs the bundle's trainer passes with the image.
    """

    bundle: str
    crop_id: str
    description: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    reference: Callable[[ConfigParser], nn.Module] | None = None
    official: Callable[[ConfigParser, Path], nn.Module] | None = None
    inputs: Callable[[torch.Tensor], dict[str, torch.Tensor]] = _no_inputs


NETWORKS: dict[str, NetworkSpec] = {
    "hiend_mae": NetworkSpec(
        "hiend_mae", "roi_size",
        "Hi-End-MAE; reference MONAI MAE (4 decoder blocks, embeds all patches before masking)",
        reference=hiend_mae_reference, official=official_hiend_mae,
    ),
    "maesil": NetworkSpec(
        "maesil", "superpatch_size",
        "MAESIL on one superpatch (dual mask); reference MONAI MAE masking at random with the same visible count",
        reference=maesil_reference, inputs=_all_valid,
    ),
    **{
        f"frepa_{kind}": NetworkSpec(
            "frepa", "roi_size", f"Frepa, {kind} encoder (no MONAI reference; FFT FLOPs not counted)",
            overrides={"encoder_kind": kind},
        )
        for kind in ("vit", "swin", "cnn")
    },
}


def network_config(name: str, preset: Mapping[str, Any]) -> ConfigParser:
    """The parsed bundle config of NETWORKS[name] at ``preset`` (with its "img" crop edge when given)."""
    if name not in NETWORKS:
        raise KeyError(f"unknown network '{name}'; choose from {sorted(NETWORKS)}")
    spec = NETWORKS[name]
    overrides = dict(spec.overrides)
    if preset.get("img"):
        overrides[spec.crop_id] = [int(preset["img"])] * 3
    return bundle_config(spec.bundle, preset, overrides)


def build(name: str, preset: Mapping[str, Any], role: str = "ours", official: Path | None = None) -> nn.Module:
    """NETWORKS[name] in one role: "ours" as its bundle's configs build it (``network_def``), "reference"
    MONAI's MAE at its size, "official" the official implementation from the checkout ``official``."""
    parser = network_config(name, preset)
    if role == "ours":
        return parser.get_parsed_content("network_def")
    if role == "reference":
        if NETWORKS[name].reference is None:
            raise ValueError(f"network '{name}' has no MONAI reference")
        return NETWORKS[name].reference(parser)
    if role == "official" and NETWORKS[name].official is not None and official is not None:
        return NETWORKS[name].official(parser, official)
    raise ValueError(f"no '{role}' network for '{name}'")


class TrainingStep:
    """One trainer iteration of ``network`` on a fixed batch: call it to run a step.

    The optimizer and gradient clipping are the bundle's (``optimizer`` and ``grad_clip_norm`` of
    its config). MONAI's MAE returns (pred, mask); it gets the bundle's masked MSE (same
    norm-pixel setting). The official Hi-End-MAE returns its loss. With ``compile`` the forward +
    loss runs through torch.compile.
    """

    def __init__(
        self, name: str, network: nn.Module, image: torch.Tensor, preset: Mapping[str, Any] = PRESETS["paper"],
        compile: bool = False,
    ) -> None:
        parser = network_config(name, preset)
        optimizer = parser["optimizer"]
        settings = {
            key: parser.get_parsed_content(f"optimizer#{key}") for key in optimizer if key not in ("_target_", "params")
        }
        self.optimizer = instantiate(optimizer["_target_"], "default", params=network.parameters(), **settings)
        self.clip_norm = parser.get("grad_clip_norm")
        self.network = network
        self.image = image
        inputs = NETWORKS[name].inputs(image)
        if isinstance(network, MaskedAutoEncoderViT):
            norm_pix = parser.get_parsed_content("network_def#norm_pix_loss")

            def loss(image: torch.Tensor) -> torch.Tensor:
                pred, mask = network(image)
                return masked_mse(pred, patchify(image, network.patch_size), mask, norm_pix=norm_pix)
        else:

            def loss(image: torch.Tensor) -> torch.Tensor:
                output = network(image, **inputs)
                return output if isinstance(output, torch.Tensor) else output["loss"]

        self.eager_loss = loss
        # Static shapes: Frepa corrupts its batch in parts of changing size around a graph break (the
        # threaded noise), and a dynamic batch size reaches torch.randn(..., generator=...), which
        # torch cannot trace with a symbolic size.
        self.loss = torch.compile(loss, dynamic=False) if compile else loss

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.image.device.type, dtype=torch.bfloat16, enabled=self.image.device.type == "cuda"):
            loss = self.loss(self.image)
        loss.backward()
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.clip_norm)
        self.optimizer.step()

    def flops(self) -> int:
        """FLOPs of one forward + backward (see the module docstring for what is counted)."""
        aten = torch.ops.aten
        cpu_sdpa = {  # same argument order as the generic SDPA ops that torch has formulas for
            aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
                lambda grad, q, k, v, *_, **__: sdpa_backward_flop_count(grad, q, k, v),
        }
        counter = FlopCounterMode(display=False, custom_mapping=cpu_sdpa)
        with counter:
            self.eager_loss(self.image).backward()
        self.network.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def make_step(name: str, network: nn.Module, image: torch.Tensor, preset: Mapping[str, Any] = PRESETS["paper"],
              compile: bool = False) -> TrainingStep:
    """A :class:`TrainingStep` of ``network`` (ours or its reference) on ``image``."""
    return TrainingStep(name, network, image, preset, compile)


def build_step(name: str, role: str, preset: Mapping[str, Any], batch: int, device: torch.device,
               compile: bool = False, official: Path | None = None) -> TrainingStep:
    """Build the network of ``role`` (seed 0) and a random batch of crops of its bundle's crop size on ``device``."""
    torch.manual_seed(0)
    network = build(name, preset, role, official).to(device)
    crop = network_config(name, preset).get_parsed_content(NETWORKS[name].crop_id)
    image = torch.rand(batch, 1, *crop, generator=torch.Generator().manual_seed(0)).to(device)
    return make_step(name, network, image, preset, compile)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(device: torch.device, dtype: torch.dtype, rounds: int = 10) -> float:
    """Median FLOP/s of square matrix products: 2048^2 on CPU, 8192^2 (20 per timing) on CUDA."""
    size, calls = (2048, 1) if device.type == "cpu" else (8192, 20)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 * calls / statistics.median(times)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started (or exec'd).

    Linux's ru_maxrss is kept across exec, so in a spawned child it starts at the parent's size
    at fork time; /proc's VmHWM belongs to the new process image only.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_memory_child(name, role, preset, batch, device, threads, compile, official, queue) -> None:
    torch.set_num_threads(threads)
    before = peak_rss_bytes()
    device = torch.device(device)
    step = build_step(name, role, preset, batch, device, compile, official)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):  # the first step creates the gradients and the optimizer state
        step()
    _sync(device)
    if device.type == "cuda":
        queue.put({"kind": "torch.cuda.max_memory_allocated, fresh process",
                   "peak_bytes": torch.cuda.max_memory_allocated(device)})
    else:
        queue.put({"kind": "peak RSS (VmHWM) of a fresh process", "before_build_bytes": before,
                   "peak_bytes": peak_rss_bytes()})


def peak_memory(name: str, role: str, preset: Mapping[str, Any], batch: int, device: torch.device,
                threads: int, compile: bool, official: Path | None = None) -> dict:
    """Peak memory of two training steps in a fresh process (see the module docstring)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_peak_memory_child,
                            args=(name, role, dict(preset), batch, str(device), threads, compile, official, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def time_alternating(steps: Mapping[str, Callable[[], None]], warmup: int, repeats: int, device: torch.device) -> dict:
    """Step times in seconds per role, the roles' steps alternating so both see the same machine state."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    _sync(device)
    times: dict[str, list[float]] = {role: [] for role in steps}
    for _ in range(repeats):
        for role, step in steps.items():
            start = time.perf_counter()
            step()
            _sync(device)
            times[role].append(time.perf_counter() - start)
    return times


def time_network(name: str, roles: Sequence[str], args: argparse.Namespace, device: torch.device,
                 gemm: float) -> dict:
    """Step time, throughput and FLOPs of NETWORKS[name] in each role, timed alternating."""
    preset = PRESETS[args.preset]
    if args.compile:
        # Code shared with an earlier network (the encoder, patchify) would be recompiled for dynamic
        # shapes, which the masking's random draws do not trace; one bundle per process never sees that.
        torch._dynamo.reset()
    steps = {role: build_step(name, role, preset, args.batch, device, args.compile, args.official_hiend_mae)
             for role in roles}
    flops = {role: step.flops() for role, step in steps.items()}
    times = time_alternating(steps, args.warmup, args.steps, device)
    entry: dict[str, Any] = {
        "bundle": NETWORKS[name].bundle,
        "description": NETWORKS[name].description,
        "input_shape": list(steps["ours"].image.shape),
    }
    for role, step in steps.items():
        median = statistics.median(times[role])
        entry[role] = {
            "network": f"{type(step.network).__module__}.{type(step.network).__name__}",
            "parameters": sum(p.numel() for p in step.network.parameters()),
            "step_s_median": median,
            "step_s": times[role],
            "samples_per_s": args.batch / median,
            "step_gflop": flops[role] / 1e9,
            "achieved_gflop_s": flops[role] / median / 1e9,
            "mfu_vs_gemm": flops[role] / median / gemm,
            "mfu_vs_peak": flops[role] / median / (args.peak_tflops * 1e12) if args.peak_tflops else None,
        }
    if "reference" in steps:
        entry["reference"]["mask_ratio"] = steps["reference"].network.masking_ratio
        entry["time_ratio_ours_over_reference"] = entry["ours"]["step_s_median"] / entry["reference"]["step_s_median"]
    if "official" in steps:
        entry["official"].update(official_provenance(args.official_hiend_mae))
        entry["time_ratio_ours_over_official"] = entry["ours"]["step_s_median"] / entry["official"]["step_s_median"]
    return entry


def benchmark_network(name: str, args: argparse.Namespace, device: torch.device, gemm: float) -> dict:
    """Every measurement of NETWORKS[name] in its roles; memory after this process freed their networks."""
    roles = ["ours"] + (["reference"] if NETWORKS[name].reference is not None else [])
    roles += ["official"] if NETWORKS[name].official is not None and args.official_hiend_mae is not None else []
    entry = time_network(name, roles, args, device, gemm)
    for role in roles:
        entry[role]["peak_memory"] = peak_memory(
            name, role, PRESETS[args.preset], args.batch, device, args.threads, args.compile, args.official_hiend_mae
        )
    return entry


def machine_info(device: torch.device, threads: int) -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_at_start": os.getloadavg(),
    }


def parse_run_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                        device: bool = True) -> argparse.Namespace:
    """Parse ``argv`` with the options every benchmark script takes added to ``parser`` (--device
    unless ``device`` is False, --threads, --out), and give torch the threads asked for."""
    if device:
        parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (e.g. bench/results/...)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--networks", nargs="+", choices=sorted(NETWORKS), default=list(NETWORKS))
    parser.add_argument("--batch", type=int, default=2, help="crops per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per network")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the forward + loss")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's datasheet peak in the step's dtype, for MFU against it")
    parser.add_argument("--official-hiend-mae", type=Path, default=None, metavar="CHECKOUT",
                        help="a checkout of github.com/FengheTan9/Hi-End-MAE (with timm 0.5.4 installed): time the "
                             "official implementation beside hiend_mae (paper preset)")
    return parse_run_arguments(parser, argv)


def step_report(benchmark: str, argv: Sequence[str] | None, machine: dict, args: argparse.Namespace) -> dict:
    """The head of a JSON report on training steps: what ran (command, preset, batch, step counts) and where."""
    return {
        "benchmark": benchmark,
        "command": " ".join([f"python bench/bench_{benchmark}.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine,
        "preset": args.preset,
        "configs": list(PRESETS[args.preset]["configs"]),
        "batch": args.batch,
        "warmup": args.warmup,
        "steps": args.steps,
    }


def write_report(report: dict, out: Path | None) -> None:
    """Write a benchmark's JSON report to ``out`` (nothing when None)."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    machine = machine_info(device, args.threads)
    gemm = gemm_rate(device, dtype)
    print(f"GEMM {gemm / 1e9:.1f} GFLOP/s ({dtype})", flush=True)
    networks = {}
    for name in args.networks:
        entry = networks[name] = benchmark_network(name, args, device, gemm)
        for role in ("ours", "reference", "official"):
            if role in entry:
                r = entry[role]
                print(f"{name:11s} {role:9s} {r['step_s_median']:8.3f} s/step {r['samples_per_s']:7.2f} samples/s "
                      f"{r['step_gflop']:8.1f} GFLOP  MFU {100 * r['mfu_vs_gemm']:5.1f}%  "
                      f"peak {r['peak_memory']['peak_bytes'] / 2**20:7.0f} MiB", flush=True)
        if "time_ratio_ours_over_reference" in entry:
            print(f"{name:11s} time ratio ours / MONAI MAE: {entry['time_ratio_ours_over_reference']:.3f}", flush=True)
        if "time_ratio_ours_over_official" in entry:
            print(f"{name:11s} time ratio ours / official: {entry['time_ratio_ours_over_official']:.3f}", flush=True)
    gemm_end = gemm_rate(device, dtype)  # a drift between the two says the machine's load changed meanwhile
    machine["load_average_at_end"] = os.getloadavg()
    report = {
        **step_report("pretrain_step", argv, machine, args),
        "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32",
        "compile": args.compile,
        "gemm_gflop_s": gemm / 1e9,
        "gemm_gflop_s_at_end": gemm_end / 1e9,
        "peak_tflops": args.peak_tflops,
        "flop_counting": "torch FlopCounterMode: matmul, convolution, attention (CPU flash SDPA mapped to torch's "
                         "SDPA formulas); FFT, normalisation, interpolation and elementwise ops count 0",
        "networks": networks,
    }
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
