"""`make demo`: does pretraining help when labels are scarce? One small, real run of the question.

1. Pretrain Hi-End-MAE with its demo preset on the embedded phantom CT scans.
2. Fine-tune seg_finetune (UNETR) from those weights and from scratch, with the same budget and
   the same few labelled scans.
3. Evaluate both on the held-out phantoms and print their mean foreground Dice.

Every step is the bundle's own MONAI CLI command, printed before it runs, so it can be re-run by
hand. Outputs go to runs/demo/ (pretraining to bundles/hiend_mae/models, as a user's run would).
"""

from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
import time
from pathlib import Path

DEMO_CONFIGS = "['configs/train.json','configs/demo.json']"
EVALUATE_CONFIGS = "['configs/train.json','configs/demo.json','configs/evaluate.json']"


def repository_root() -> Path:
    root = Path(__file__).resolve().parents[2]
    if not (root / "bundles").is_dir():
        raise SystemExit(f"medssl.demo needs the repository checkout (bundles/ not found beside {root / 'shared'})")
    return root


def run_bundle(bundle: Path, configs: str, *overrides: str) -> float:
    """Run ``python -m monai.bundle run`` in the bundle's folder; returns the wall time in seconds."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, *overrides]
    print(f"\n$ (cd {bundle.relative_to(repository_root())} && {shlex.join(command[1:])})", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=bundle)
    if result.returncode != 0:
        raise SystemExit(f"the command above failed (exit {result.returncode}); its log is printed above")
    return time.perf_counter() - start


def read_metric(metrics_csv: Path, name: str) -> float:
    """Read one value from MONAI's MetricsSaver ``metrics.csv`` (tab-separated name, value)."""
    with open(metrics_csv, newline="") as handle:
        for row in csv.reader(handle, delimiter="\t"):
            if row and row[0] == name:
                return float(row[1])
    raise SystemExit(f"{metrics_csv} has no metric {name!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, default=2, help="labelled training scans for fine-tuning")
    parser.add_argument("--out", default="runs/demo", help="folder for the fine-tuning runs (relative to the repository)")
    args = parser.parse_args(argv)

    root = repository_root()
    pretrain, finetune = root / "bundles" / "hiend_mae", root / "bundles" / "seg_finetune"
    out = (root / args.out).resolve()
    times = {"pretraining": run_bundle(pretrain, DEMO_CONFIGS)}

    dice = {}
    for start in ("pretrained", "scratch"):
        run_dir = out / start
        common = ["--ckpt_dir", str(run_dir / "models"), "--output_dir", str(run_dir / "eval"),
                  "--data_root", str(out / "data"), "--label_count", str(args.labels)]
        source = ["--pretrained#bundle_name", "hiend_mae", "--pretrained#bundle_dir", str(root / "bundles")]
        times[f"fine-tuning ({start})"] = run_bundle(finetune, DEMO_CONFIGS, *common,
                                                     *(source if start == "pretrained" else []))
        run_bundle(finetune, EVALUATE_CONFIGS, *common)
        dice[start] = read_metric(run_dir / "eval" / "metrics.csv", "val_mean_dice")

    print("\nHeld-out mean foreground Dice (UNETR, ViT-tiny encoder, "
          f"{args.labels} labelled phantom scans, same fine-tuning budget):")
    print(f"  from Hi-End-MAE pretraining: {dice['pretrained']:.4f}")
    print(f"  from scratch:                {dice['scratch']:.4f}")
    print("Wall time: " + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in times.items()))


if __name__ == "__main__":
    main()
