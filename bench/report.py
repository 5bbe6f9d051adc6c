"""Write docs/benchmarks.md from bench/results/*.json: one Markdown table per result file, then
the issue's performance targets judged from those numbers alone.

Each table names the command that produced it, the machine and the load average while it ran.
Files it does not recognise are listed, not guessed at.

    python bench/report.py                       # bench/results -> docs/benchmarks.md
    python bench/report.py --results /tmp/r --out /tmp/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20

# The targets (issue 12), as thresholds on the measured numbers.
MAX_TIME_RATIO = 1.0  # our step time / MONAI MAE's, measured alternating in one run
MIN_SPEEDUP_OVER_OFFICIAL = 1.1  # the official Hi-End-MAE's step time / ours, alternating in one run
CPU_MFU_PAPER = 0.60  # ViT-B pretraining steps against the measured fp32 GEMM rate
CPU_MFU_DEMO = 0.45  # the tiny demo size
GPU_MFU_PEAK = 0.35  # against the bf16 datasheet peak
MAX_CORRUPTION_SHARE = 0.02  # masking and frequency corruption, fraction of a training step
VIT_NETWORKS = ("hiend_mae", "maesil", "frepa_vit")  # the pretraining steps with a ViT encoder
RATIO_INTERVAL_LEVEL = 0.9  # bootstrap interval shown beside every time ratio
RATIO_INTERVAL_RESAMPLES = 2000
CORRUPTION_OPS = (  # bench_ops.py entries that mask or corrupt the input (not losses or filters)
    "patchify", "random_masking", "block_masking", "dual_masking", "gather_tokens", "scatter_tokens",
    "spectral_patch_mask", "low_frequency_perturbation", "frequency_corruption", "histogram_equalised_mask",
    "frepa_corruption",
)


# ---------------------------------------------------------------- formatting
def number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def percent(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def mib(value: int | None) -> str:
    return "–" if value is None else f"{value / MIB:.0f}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def load_text(values: Any) -> str:
    if values is None:
        return "–"
    if isinstance(values, (int, float)):
        return f"{values:.2f} (1 min)"
    return " / ".join(f"{v:.2f}" for v in values) + " (1/5/15 min)"


def provenance(path: Path, report: dict) -> list[str]:
    """The command, machine and load lines every table starts with."""
    machine = report.get("machine", {})
    device = machine.get("device_name") or machine.get("gpu") or machine.get("device", "cpu")
    cpu = machine.get("cpu") or machine.get("platform") or "?"
    threads = machine.get("torch_threads", machine.get("cpu_threads"))
    cores = machine.get("cpu_count", machine.get("os_cpu_count", "?"))
    lines = [
        f"From `{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}`.",
        "",
        f"- command: `{report.get('command', '?')}`",
        f"- machine: {device}; CPU {cpu}, {cores} cores, {threads} torch threads; "
        f"torch {machine.get('torch', '?')}",
    ]
    if "load_average_at_start" in machine:
        lines.append(f"- load average: at start {load_text(machine['load_average_at_start'])}, "
                     f"at end {load_text(machine.get('load_average_at_end'))}")
    elif "load_average_1min_at_end" in machine:
        lines.append(f"- load average at end: {load_text(machine['load_average_1min_at_end'])}")
    return lines + [""]


def ratio_interval(
    ours: Sequence[float], other: Sequence[float], level: float = RATIO_INTERVAL_LEVEL,
    resamples: int = RATIO_INTERVAL_RESAMPLES,
) -> tuple[float, float]:
    """Bootstrap interval of median(ours) / median(other) over steps timed in alternation.

    Step i of both lists ran back to back, so pairs are resampled together (a slow minute of the
    machine slows both). Seeded: the report is the same every time it is written.
    """
    pairs = list(zip(ours, other))
    rng = random.Random(0)
    ratios = []
    for _ in range(resamples):
        drawn = rng.choices(pairs, k=len(pairs))
        ratios.append(statistics.median(a for a, _ in drawn) / statistics.median(b for _, b in drawn))
    ratios.sort()
    tail = round((1 - level) / 2 * resamples)
    return ratios[tail], ratios[resamples - 1 - tail]


def ratio_text(entry: dict, role: str, inverse: bool = False) -> str:
    """The ours / ``role`` step-time ratio of a network entry of a step result, with its interval, e.g.
    "1.001 (0.972–1.030)"; with ``inverse`` the speed-up ``role`` / ours instead, e.g. "1.13× (1.10–1.16)"."""
    low, high = ratio_interval(entry["ours"]["step_s"], entry[role]["step_s"])
    ratio = entry[f"time_ratio_ours_over_{role}"]
    if inverse:
        return f"{1 / ratio:.2f}× ({1 / high:.2f}–{1 / low:.2f})"
    return f"{ratio:.3f} ({low:.3f}–{high:.3f})"


# ---------------------------------------------------------------- one section per result kind
def official_note(official: dict | None) -> str:
    """Which official code a step result timed beside ours (its Hi-End-MAE entry's "official"), if any."""
    if official is None:
        return ""
    commit = (official.get("commit") or "unknown commit")[:7]
    return (f", and Hi-End-MAE also with the official code (FengheTan9/Hi-End-MAE at {commit}, timm "
            f"{official.get('timm')})")


def pretrain_step_section(path: Path, report: dict) -> list[str]:
    peak_header = ["MFU vs peak"] if report.get("peak_tflops") else []
    official = report["networks"].get("hiend_mae", {}).get("official")
    ratio_keys = ["time_ratio_ours_over_reference"] + (["time_ratio_ours_over_official"] if official else [])
    rows = []
    for name, entry in report["networks"].items():
        for role in ("ours", "reference", "official"):
            if role not in entry:
                continue
            r = entry[role]
            model = r["network"].rsplit(".", 1)[-1] + (" (official code)" if role == "official" else "")
            rows.append([
                name, model, "×".join(map(str, entry["input_shape"])),
                number(r["step_s_median"], 3), number(r["samples_per_s"]), number(r["step_gflop"], 1),
                number(r["achieved_gflop_s"], 1), percent(r["mfu_vs_gemm"]),
                *([percent(r.get("mfu_vs_peak"))] if peak_header else []),
                mib(r["peak_memory"]["peak_bytes"]),
                *(number(entry.get(key), 3) if role == "ours" else "" for key in ratio_keys),
            ])
    header = ["network", "model", "batch", "s/step (median)", "samples/s", "GFLOP/step", "GFLOP/s",
              "MFU vs GEMM", *peak_header, "peak MiB", "time ratio ours/MONAI",
              *(["time ratio ours/official"] if official else [])]
    peak = f", datasheet peak {report['peak_tflops']} TFLOP/s" if report.get("peak_tflops") else ""
    return [
        f"### Pretraining step, {report['preset']} preset ({report['machine']['device']}, {report['dtype']}"
        f"{', torch.compile' if report.get('compile') else ''})",
        "",
        *provenance(path, report),
        "A step is the forward pass, the backward pass and the bundle's `optimizer` step (AdamW with "
        "`fused=True` in every bundle) with its gradient clipping. "
        f"Median of {report['steps']} steps after {report['warmup']} warm-up steps, each network alternating with "
        f"its MONAI reference{official_note(official)}. GEMM rate in the same run: {report['gemm_gflop_s']:.1f} GFLOP/s "
        f"({report.get('gemm_gflop_s_at_end', 0):.1f} at the end){peak}. FLOPs: {report['flop_counting']}. "
        f"Peak memory: {next(iter(report['networks'].values()))['ours']['peak_memory']['kind']}.",
        "",
        *table(header, rows),
        "",
    ]


def step_source(rate: dict) -> str:
    """Where a data report's step rate came from: the step result's file, else the device or 'given'."""
    where = Path(rate["source"]).name if rate.get("source") else "given"
    return f"{rate['device']} step, {where}" if rate.get("device") else where


def finetune_step_section(path: Path, report: dict) -> list[str]:
    amp, gemm = report["amp_dtype"], report["gemm_gflop_s"]
    rows = []
    for kind, entry in report["networks"].items():
        low, high = ratio_interval(entry["float32"]["seconds"], entry["amp"]["seconds"])
        rows.append([
            f"{kind} ({entry['network']})", "×".join(map(str, entry["batch"])), number(entry["gflop"], 1),
            number(entry["float32"]["seconds_median"]), number(entry["amp"]["seconds_median"]),
            f"{entry['speedup']:.2f}× ({low:.2f}–{high:.2f})",
            percent(entry["float32"]["fraction_of_gemm"]), percent(entry["amp"]["fraction_of_gemm"]),
        ])
    header = ["network", "batch", "GFLOP/step", "float32 s/step", f"amp ({amp}) s/step", "speed-up",
              "float32 vs float32 GEMM", f"amp vs {amp} GEMM"]
    return [
        f"### Fine-tuning step, {report['preset']} preset ({report['machine']['device']}, float32 and amp)",
        "",
        *provenance(path, report),
        f"One seg_finetune iteration (train#inferer, DiceCE, backward, fused AdamW) built from the bundle's configs "
        f"with amp false and true, alternating; median of {report['steps']} steps after {report['warmup']} warm-up. "
        f"Speed-up: float32 over amp step time, with the {RATIO_INTERVAL_LEVEL:.0%} bootstrap interval over the "
        f"alternating steps. GEMM rates in the same run: {gemm['float32']:.1f} GFLOP/s float32, "
        f"{gemm['amp']:.1f} GFLOP/s {amp}. FLOPs: convolutions and matrix products of the float32 step.",
        "",
        *table(header, rows),
        "",
    ]


def data_section(path: Path, report: dict) -> list[str]:
    rows = []
    for bundle, b in report["bundles"].items():
        rates = "; ".join(f"{r['samples_per_s']:.2f} ({step_source(r)})" for r in b["step_rates"]) or "–"
        headroom = "; ".join(f"{r['loader_headroom']:.1f}×" for r in b["step_rates"]) or "–"
        workers = f"{b['num_workers']}" + ("" if b.get("num_workers_is_bundle_default", True) else " (set)")
        rows.append([
            bundle, b["dataset"], workers, b["batch_size"], b["crops_per_scan"], "×".join(map(str, b["crop_shape"])),
            b["cached_scans"], number(b["caching_s"], 1), number(b["crops_per_s"]), number(b["scans_per_s"]),
            rates, headroom,
        ])
    header = ["bundle", "dataset", "workers", "scans/batch", "crops/scan", "crop", "scans", "caching s",
              "crops/s", "scans/s", "step samples/s", "loader / step"]
    return [
        f"### Data pipeline, {report['preset']} preset",
        "",
        *provenance(path, report),
        f"Each bundle's own train#dataloader; data: {report['data']}. Rates over whole epochs (workers start "
        "anew each epoch). Loader / step above 1 means the loader keeps up with the step.",
        "",
        *table(header, rows),
        "",
    ]


def inference_section(path: Path, report: dict) -> list[str]:
    r = report["result"]
    row = [
        f"{r['network']} ({r['encoder_size']})", "×".join(map(str, r["scan_shape"])), "×".join(map(str, r["roi_size"])),
        r["sw_batch_size"], r["overlap"], r["windows"], number(r["seconds_median"]), number(r["gflop"], 0),
        number(r["achieved_gflop_s"], 1), percent(r["fraction_of_gemm"]), mib(r["peak_memory"]["peak_bytes"]),
    ]
    header = ["network", "scan", "roi", "sw batch", "overlap", "windows", "s/scan (median)", "GFLOP", "GFLOP/s",
              "vs GEMM", "peak MiB"]
    return [
        f"### Sliding-window inference, {report['preset']} preset ({report['machine']['device']}, {report['dtype']})",
        "",
        *provenance(path, report),
        f"Median of {report['repeats']} passes after {report['warmup']} warm-up; GEMM rate in the same run "
        f"{report['gemm_gflop_s']:.1f} GFLOP/s (bfloat16 on CUDA and under autocast on the CPU, float32 otherwise); "
        f"peak memory: {r['peak_memory']['kind']}.",
        "",
        *table(header, [row]),
        "",
    ]


STEP_NAMES = {"hiend_mae": "Hi-End-MAE", "frepa_vit": "Frepa-ViT"}  # bench_ops.py's reference steps


def ops_section(path: Path, report: dict) -> list[str]:
    steps = report.get("vit_b16_steps_ms", {})
    rows = [
        [name, ", ".join(o.get("feeds", [])), number(o["batched_ms"], 1), number(o.get("loop_ms"), 1),
         number(o.get("speedup"), 2), *(percent(o.get("fraction_of_step", {}).get(step), 2) for step in steps)]
        for name, o in report["ops"].items()
    ]
    config = report.get("config", {})
    step_text = "; ".join(f"{STEP_NAMES.get(step, step)} {ms:.0f} ms" for step, ms in steps.items())
    return [
        f"### Masking, corruption and loss ops (input {'×'.join(map(str, config.get('input_shape', [])))})",
        "",
        *provenance(path, report),
        f"{config.get('statistic', 'median')}; per-sample loop references "
        "(one sample and one patch, block or slab at a time)"
        + (f". Shares of ViT-B/16 training steps on the same batch ({step_text}): every op against Hi-End-MAE's, "
           "the cheapest, and Frepa's ops also against Frepa's, which runs them (its step includes the corruption)."
           if steps else "."),
        "",
        *table(["op", "runs in", "batched ms", "loop ms", "speed-up",
                *(f"share of {STEP_NAMES.get(step, step)} step" for step in steps)], rows),
        "",
    ]


def maesil_section(path: Path, report: dict) -> list[str]:
    rows = [
        [r["mode"], r["batch_size"], number(r["step_seconds_median"], 2), number(r["peak_memory_mib"], 0),
         r["memory_kind"], r["sdpa_calls_per_step"]]
        for r in report["results"]
    ]
    config = report["config"]
    return [
        f"### MAESIL on one {config['superpatch_size']}³ superpatch (bench_maesil.py)",
        "",
        *provenance(path, report),
        f"{config['tokens']} tokens, {config['visible_tokens']} visible when masked.",
        "",
        *table(["mode", "batch", "s/step (median)", "peak MiB", "memory", "SDPA calls"], rows),
        "",
    ]


PROFILE_TOP_OPS = 5  # operators listed per network and role


def profile_section(path: Path, report: dict) -> list[str]:
    roles = [(name, role, entry[role]) for name, entry in report["networks"].items()
             for role in ("ours", "reference") if role in entry]
    categories = list(roles[0][2]["categories"]) if roles else []
    gemm = report["gemm_gflop_s"]
    shares = [
        [name, entry["network"], number(entry["profiled_step_s"], 3),
         "–" if entry["matmul_gflop_s"] is None  # a network without matrix products (a CNN)
         else f"{entry['matmul_gflop_s']:.0f} ({percent(entry['matmul_gflop_s'] / gemm)})",
         *(percent(entry["categories"][label]["share"]) for label in categories)]
        for name, _, entry in roles
    ]
    top = [
        [name, entry["network"], op["op"], op["category"], number(op["ms_per_step"], 1), percent(op["share"]),
         number(op["calls_per_step"], 0)]
        for name, _, entry in roles for op in entry["top_ops"][:PROFILE_TOP_OPS]
    ]
    shape = next(iter(report["networks"].values()), {}).get("input_shape") or []
    return [
        f"### Where a pretraining step's time goes, {report['preset']} preset "
        f"({report['machine'].get('device', 'cpu')}, torch.profiler)",
        "",
        *provenance(path, report),
        f"The steps of bench_pretrain_step.py (batch {'×'.join(map(str, shape))}), {report['steps']} profiled after "
        f"{report['warmup']} warm-up; each operator's {report['time']} goes to one category, and a share is of the "
        "summed self time (the categories' rules are in bench/bench_profile.py). Matrix products, attention and "
        "convolution are the work MFU counts; the rest holds it down. The matrix products' own rate (FLOPs from "
        f"their input shapes over their self time) against the {report['gemm_dtype']} GEMM rate of 2048² matrices "
        f"measured in the same run, {gemm:.1f} GFLOP/s, says how much their shapes hold it down. The profiled step "
        "time includes the profiler's overhead.",
        "",
        *table(["network", "model", "profiled s/step", "matmul GFLOP/s (of GEMM)", *categories], shares),
        "",
        f"The {PROFILE_TOP_OPS} operators with the most self time per step:",
        "",
        *table(["network", "model", "operator", "category", "ms/step", "share", "calls/step"], top),
        "",
    ]


def kind_of(report: dict) -> str | None:
    if report.get("benchmark") in SECTIONS:
        return report["benchmark"]
    if "ops" in report:
        return "ops"
    if "results" in report and "superpatch_size" in report.get("config", {}):
        return "maesil"
    return None


SECTIONS: dict[str, Callable[[Path, dict], list[str]]] = {
    "pretrain_step": pretrain_step_section,
    "finetune_step": finetune_step_section,
    "data": data_section,
    "inference": inference_section,
    "ops": ops_section,
    "maesil": maesil_section,
    "profile": profile_section,
}


# ---------------------------------------------------------------- targets
def verdict(ok: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "no result"}[ok]


def target_rows(results: list[tuple[Path, str, dict]]) -> list[list[str]]:
    """[target, where, measured, verdict] for every number that bears on a target."""
    rows = []
    steps = [(path, report) for path, kind, report in results if kind == "pretrain_step"]
    for method in ("hiend_mae", "maesil"):
        found = False
        for path, report in steps:
            entry = report["networks"].get(method, {})
            if "time_ratio_ours_over_reference" in entry:
                found = True
                ratio = entry["time_ratio_ours_over_reference"]
                rows.append([f"{method} step time ≤ MONAI MAE's (ratio ≤ {MAX_TIME_RATIO})",
                             f"{path.name} ({report['preset']}, {report['machine']['device']}, batch {report['batch']})",
                             ratio_text(entry, "reference"), verdict(ratio <= MAX_TIME_RATIO)])
        if not found:
            rows.append([f"{method} step time ≤ MONAI MAE's", "–", "–", verdict(None)])
    cpu_found = False
    for path, report in steps:
        if report["machine"]["device"] != "cpu":
            continue
        threshold = CPU_MFU_PAPER if report["preset"] == "paper" else CPU_MFU_DEMO
        for name in VIT_NETWORKS:
            if name in report["networks"]:
                cpu_found = True
                mfu = report["networks"][name]["ours"]["mfu_vs_gemm"]
                note = " (FFT FLOPs not counted)" if name.startswith("frepa") else ""
                rows.append([f"CPU {report['preset']} ViT step ≥ {threshold:.0%} of GEMM",
                             f"{path.name}: {name}, batch {report['batch']}",
                             f"{mfu:.1%}{note}", verdict(mfu >= threshold)])
    if not cpu_found:
        rows.append(["CPU ViT step MFU", "–", "–", verdict(None)])
    gpu_found = False
    for path, report in steps:
        if report["machine"]["device"] == "cpu":
            continue
        for name, entry in report["networks"].items():
            gpu_found = True
            mfu_peak = entry["ours"].get("mfu_vs_peak")
            measured = (f"{mfu_peak:.1%} of {report['peak_tflops']} TFLOP/s" if mfu_peak is not None
                        else f"{entry['ours']['mfu_vs_gemm']:.1%} of measured bf16 GEMM; no datasheet peak given")
            rows.append([f"GPU step ≥ {GPU_MFU_PEAK:.0%} of bf16 peak",
                         f"{path.name}: {name} ({report['machine'].get('device_name')})", measured,
                         verdict(None if mfu_peak is None else mfu_peak >= GPU_MFU_PEAK)])
    if not gpu_found:
        rows.append([f"GPU step ≥ {GPU_MFU_PEAK:.0%} of bf16 peak", "–", "no GPU result", verdict(None)])
    ops_found = False
    for path, kind, report in results:
        if kind != "ops":
            continue
        for name in CORRUPTION_OPS:
            for step, share in report["ops"].get(name, {}).get("fraction_of_step", {}).items():
                ops_found = True
                rows.append([f"masking / corruption < {MAX_CORRUPTION_SHARE:.0%} of a "
                             f"{STEP_NAMES.get(step, step)} ViT-B/16 step", f"{path.name}: {name}",
                             f"{share:.2%}", verdict(share < MAX_CORRUPTION_SHARE)])
    if not ops_found:
        rows.append(["masking / corruption share of a step", "–", "no ops result with a step reference",
                     verdict(None)])
    data_found = False
    for path, kind, report in results:
        if kind != "data":
            continue
        for bundle, b in report["bundles"].items():
            if not b.get("num_workers_is_bundle_default", True):
                continue
            for rate in b["step_rates"]:
                data_found = True
                rows.append(["data loader keeps up at the default worker count",
                             f"{path.name}: {bundle}, {b['num_workers']} workers vs {step_source(rate)}",
                             f"{b['crops_per_s']:.2f} vs {rate['samples_per_s']:.2f} samples/s",
                             verdict(rate["loader_headroom"] >= 1.0)])
    if not data_found:
        rows.append(["data loader keeps up at the default worker count", "–", "–", verdict(None)])
    official_found = False
    for path, report in steps:
        entry = report["networks"].get("hiend_mae", {})
        ratio = entry.get("time_ratio_ours_over_official")
        if ratio is not None:
            official_found = True
            rows.append([f"≥ {MIN_SPEEDUP_OVER_OFFICIAL}× faster than the official Hi-End-MAE",
                         f"{path.name} ({report['preset']}, {report['machine']['device']})",
                         ratio_text(entry, "official", inverse=True),
                         verdict(1 / ratio >= MIN_SPEEDUP_OVER_OFFICIAL)])
    if not official_found:
        rows.append([f"≥ {MIN_SPEEDUP_OVER_OFFICIAL}× faster than the official Hi-End-MAE", "–",
                     "not run (bench_pretrain_step.py --official-hiend-mae)", verdict(None)])
    return rows


def build_report(results_dir: Path) -> str:
    results, unknown = [], []
    for path in sorted(results_dir.glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except ValueError:
            unknown.append(path.name)
            continue
        kind = kind_of(report) if isinstance(report, dict) else None
        if kind is None:
            unknown.append(path.name)
        else:
            results.append((path, kind, report))
    order = list(SECTIONS)
    source = results_dir.relative_to(ROOT) if results_dir.is_relative_to(ROOT) else results_dir
    results.sort(key=lambda item: (order.index(item[1]), item[0].name))
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python bench/report.py` from `{source}/*.json`; "
        "`make bench` reruns the scripts and this report. Every number below was measured by the command "
        "named above its table, on the machine named there; CPU timings on a shared machine move with its load.",
        "",
        "## Targets (issue 12)",
        "",
        f"Verdicts judge the measured number. Beside a time ratio, in brackets, the {RATIO_INTERVAL_LEVEL:.0%} "
        "bootstrap interval of the ratio of medians over the run's alternating steps: the spread within that run "
        "only, since separate runs on one machine have differed by more.",
        "",
        *table(["target", "result", "measured", "verdict"], target_rows(results)),
        "",
        "## Results",
        "",
    ]
    for path, kind, report in results:
        lines += SECTIONS[kind](path, report)
    if not results:
        lines += ["No results yet: run `make bench`.", ""]
    if unknown:
        lines += [f"Not understood, left out: {', '.join(unknown)}.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        raise FileNotFoundError(f"no results folder {args.results}: run the bench/ scripts (make bench) first")
    text = build_report(args.results.resolve())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
