"""Data-pipeline throughput of the pretraining bundles against the training-step rate it must feed.

Per pretraining bundle (hiend_mae, maesil, frepa) MONAI's ConfigParser builds the bundle's own
training loader, ``train#dataloader``, from configs/train.json ("paper") or train.json + demo.json
("demo"): its medssl.data transform preset, ``medssl.data.build_dataset`` with cache "cache"
(MONAI's CacheDataset), its batch size, crops per scan and default worker count. Without
--dataset-dir it reads the bundle's embedded phantom dataset (its num_phantoms, phantom_seed and
phantom_size), generated once into --data-root. The training datalist is repeated up to --scans
entries so that every worker gets batches (default: two batches per worker per epoch).

Measured per bundle:
- caching: seconds to build the dataset (load, resample, window, crop to the body, pad every scan);
- crops/s and scans/s over --epochs epochs, each epoch as training runs it (workers start anew);
  a crop is one training sample (the bundles take ``num_samples`` crops per cached scan);
- against the step rate: samples/s of the bundle's network from bench_pretrain_step results
  (every bench/results/*.json of the same preset, or --step-rate BUNDLE=SAMPLES_PER_S); the
  loader keeps up when crops/s >= samples/s. On a CPU-only machine the loader's workers and the
  step share the cores, so both rates are upper bounds of what they reach together.

    python bench/bench_data.py --preset paper --out bench/results/data_paper.json
    python bench/bench_data.py --preset demo --bundles hiend_mae --epochs 1 --step-rate hiend_mae=3.5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from monai.bundle import ConfigParser

from bench_pretrain_step import BUNDLES, parse_run_arguments, write_report  # bench/ is on sys.path when run as a script

PRESETS = {"paper": ("train.json",), "demo": ("train.json", "demo.json")}
PRETRAINING_BUNDLES = ("hiend_mae", "maesil", "frepa")
RESULTS = Path(__file__).resolve().parent / "results"


def bundle_config(bundle: str, preset: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / name) for name in PRESETS[preset]])
    return parser


def step_network(bundle: str, parser: ConfigParser) -> str:
    """The bench_pretrain_step network name of the bundle's configured network."""
    return f"frepa_{parser.get_parsed_content('encoder_kind')}" if bundle == "frepa" else bundle


def training_loader(bundle: str, args: argparse.Namespace, data_root: Path, work_dir: Path):
    """(loader, config, seconds spent caching) of the bundle's train#dataloader over the repeated datalist."""
    parser = bundle_config(bundle, args.preset)
    overrides = {"bundle_root": str(work_dir / bundle), "dataset_dir": args.dataset_dir}
    if args.dataset_dir is None:
        num, seed, shape = (parser.get_parsed_content(key) for key in ("num_phantoms", "phantom_seed", "phantom_size"))
        # bundles with the same phantom settings share one generated dataset
        overrides["data_root"] = str(data_root / f"phantoms-n{num}-seed{seed}-{'x'.join(map(str, shape))}")
    if args.num_workers is not None:
        overrides["num_workers"] = args.num_workers
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    parser.update(overrides)
    datalist = parser.get_parsed_content("train_datalist")
    if not datalist:
        raise ValueError(f"bundle {bundle}: the training datalist is empty; check --dataset-dir or num_phantoms")
    workers = max(parser.get_parsed_content("num_workers"), 1)
    wanted = args.scans or 2 * parser.get_parsed_content("batch_size") * workers
    parser["train_datalist"] = (datalist * math.ceil(wanted / len(datalist)))[: max(wanted, len(datalist))]
    start = time.perf_counter()
    loader = parser.get_parsed_content("train#dataloader")  # builds the CacheDataset: every scan is cached here
    return loader, parser, time.perf_counter() - start


def time_epochs(loader, epochs: int) -> tuple[float, int, int, list[int]]:
    """(seconds, crops, batches, shape of one crop) of ``epochs`` full passes over ``loader``."""
    crops = batches = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            crops += batch["image"].shape[0]
            batches += 1
    return time.perf_counter() - start, crops, batches, list(batch["image"].shape[1:])


def step_rates(preset: str, results_dir: Path, manual: dict[str, float]) -> dict[str, list[dict]]:
    """network name -> [{"source", "device", "samples_per_s"}] from pretrain-step results and --step-rate."""
    rates: dict[str, list[dict]] = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except ValueError:
            continue
        if report.get("benchmark") != "pretrain_step" or report.get("preset") != preset:
            continue
        for name, entry in report["networks"].items():
            rates.setdefault(name, []).append({
                "source": str(path),
                "device": report["machine"].get("device_name") or report["machine"]["device"],
                "batch": report["batch"],
                "samples_per_s": entry["ours"]["samples_per_s"],
            })
    for name, value in manual.items():
        rates.setdefault(name, []).append(
            {"source": "--step-rate", "device": None, "batch": None, "samples_per_s": value}
        )
    return rates


def parse_step_rate(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--step-rate takes NETWORK=SAMPLES_PER_S (e.g. hiend_mae=3.5), got {text!r}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--bundles", nargs="+", choices=PRETRAINING_BUNDLES, default=list(PRETRAINING_BUNDLES))
    parser.add_argument("--dataset-dir", default=None, help="a dataset folder or dataset.json instead of the phantoms")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="where the phantoms are generated and kept (default: a temporary folder, removed after)")
    parser.add_argument("--num-workers", type=int, default=None, help="loader workers (default: the bundle's)")
    parser.add_argument("--batch-size", type=int, default=None, help="scans per batch (default: the bundle's)")
    parser.add_argument("--scans", type=int, default=None,
                        help="datalist length after repeating (default: two batches per worker)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--step-rate", type=parse_step_rate, action="append", default=[],
                        help="NETWORK=SAMPLES_PER_S, e.g. hiend_mae=3.5 or frepa_vit=0.6 (adds to the results files)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of bench_pretrain_step JSON results")
    return parse_run_arguments(parser, argv, device=False)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    load_at_start = os.getloadavg()
    work_dir = Path(tempfile.mkdtemp(prefix="bench_data-"))
    data_root = args.data_root or work_dir
    rates = step_rates(args.preset, args.results, dict(args.step_rate))
    bundles = {}
    try:
        for bundle in args.bundles:
            loader, parser, caching_s = training_loader(bundle, args, data_root, work_dir)
            seconds, crops, batches, crop_shape = time_epochs(loader, args.epochs)
            crops_per_s = crops / seconds
            network = step_network(bundle, parser)
            needed = [
                rate | {"loader_headroom": crops_per_s / rate["samples_per_s"]} for rate in rates.get(network, [])
            ]
            bundles[bundle] = {
                "transforms": [type(t).__name__ for t in loader.dataset.transform.flatten().transforms],
                "dataset": type(loader.dataset).__name__,
                "cache": parser.get_parsed_content("cache"),
                "num_workers": loader.num_workers,
                "num_workers_is_bundle_default": args.num_workers is None,
                "batch_size": loader.batch_size,
                "crops_per_scan": parser.get_parsed_content("num_samples"),
                "crop_shape": crop_shape,
                "cached_scans": len(loader.dataset),
                "caching_s": caching_s,
                "epochs": args.epochs,
                "batches": batches,
                "seconds": seconds,
                "crops_per_s": crops_per_s,
                "scans_per_s": crops_per_s / parser.get_parsed_content("num_samples"),
                "step_network": network,
                "step_rates": needed,
            }
            verdicts = ", ".join(f"{r['loader_headroom']:.1f}x the step's {r['samples_per_s']:.2f}/s ({r['device']})"
                                 for r in needed) or "no step rate known"
            print(f"{bundle:10s} {crops_per_s:8.2f} crops/s with {loader.num_workers} workers "
                  f"(caching {caching_s:.1f} s): {verdicts}", flush=True)
            del loader
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    report = {
        "benchmark": "data",
        "command": " ".join(["python bench/bench_data.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
        },
        "preset": args.preset,
        "configs": list(PRESETS[args.preset]),
        "data": args.dataset_dir or "embedded phantoms of each bundle's config",
        "bundles": bundles,
    }
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
