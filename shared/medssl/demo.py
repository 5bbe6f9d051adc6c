"""`make demo`: does pretraining help when labels are scarce? One small, real run of the question.

1. Pretrain Hi-End-MAE with its demo preset on the embedded phantom CT scans.
2. Fine-tune seg_finetune (UNETR, or with ``--decoder linear`` a linear head on the ViT's tokens)
   from those weights and from scratch, with the same budget and the same few labelled scans.
3. Evaluate both on held-out phantoms (their own phantom seed: never trained on, never used to
   pick a checkpoint) and print their mean foreground Dice.

Every step is the bundle's own MONAI CLI command, printed before it runs, so it can be re-run by
hand. Outputs go to runs/demo/; its run folders are emptied first so that every demo trains
afresh: the bundles resume from the newest checkpoint in their folder (and refuse one written
with other settings).
"""

from __future__ import annotations

import argparse
import csv
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from medssl.data import default_dataset
from medssl.encoders import SEGMENTATION_DECODERS

# Pretraining phantoms use seed 1000 and fine-tuning ones seed 0 (the bundles' defaults).
HELD_OUT_PHANTOM_SEED = 2000
DEMO_CONFIGS = "['configs/train.json','configs/demo.json']"
EVALUATE_CONFIGS = "['configs/train.json','configs/demo.json','configs/evaluate.json']"


def repository_root() -> Path:
    root = Path(__file__).resolve().parents[2]
    if not (root / "bundles").is_dir():
        raise SystemExit(f"medssl.demo needs the repository checkout (bundles/ not found beside {root / 'shared'})")
    return root


def bundle_command(configs: str, *overrides: str) -> list[str]:
    """The ``python -m monai.bundle run`` command line for ``configs`` with ``--key value`` overrides."""
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, *overrides]


def shown_command(bundle: Path, command: list[str]) -> str:
    """``command`` as a shell line to re-run by hand from the repository root."""
    return f"(cd {bundle.relative_to(repository_root())} && python {shlex.join(command[1:])})"


def run_bundle(bundle: Path, configs: str, *overrides: str, log: Path | None = None) -> float:
    """Run ``python -m monai.bundle run`` in the bundle's folder; returns the wall time in seconds.

    The command is printed first. Its output goes to the terminal, or to the file ``log`` when
    given (then the last lines of that file are printed if the command fails).
    """
    command = bundle_command(configs, *overrides)
    print(f"\n$ {shown_command(bundle, command)}", flush=True)
    start = time.perf_counter()
    if log is None:
        result = subprocess.run(command, cwd=bundle)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            result = subprocess.run(command, cwd=bundle, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        if log is None:
            raise SystemExit(f"the command above failed (exit {result.returncode}); its log is printed above")
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{shown_command(bundle, command)}\nfailed (exit {result.returncode}); "
                         f"the end of its log {log}:\n{tail}")
    return time.perf_counter() - start


def read_metric(metrics_csv: Path, name: str) -> float:
    """Read one value from MONAI's MetricsSaver ``metrics.csv`` (one ``name,value`` line per metric)."""
    with open(metrics_csv, newline="") as handle:
        for row in csv.reader(handle):
            if row and row[0] == name:
                return float(row[1])
    raise SystemExit(f"{metrics_csv} has no metric {name!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, default=1, help="labelled training scans for fine-tuning")
    parser.add_argument("--steps", type=int, default=120,
                        help="fine-tuning optimiser steps (a multiple of --labels; at 20 both starts learn only "
                             "the large organs, docs/study_findings.md)")
    parser.add_argument("--out", default="runs/demo", help="folder for the fine-tuning runs (relative to the repository)")
    parser.add_argument("--held-out", type=int, default=4, help="held-out phantom scans to evaluate on")
    parser.add_argument("--decoder", choices=SEGMENTATION_DECODERS, default="default",
                        help="seg_finetune's decoder: default (UNETR) or linear (a linear head on the ViT's tokens, "
                             "so that the result comes through the encoder; docs/study_findings.md, E7)")
    args = parser.parse_args(argv)
    if args.steps % args.labels:
        parser.error(f"--steps {args.steps} is not a multiple of --labels {args.labels}: an epoch is one step per scan")
    epochs = args.steps // args.labels

    root = repository_root()
    pretrain, finetune = root / "bundles" / "hiend_mae", root / "bundles" / "seg_finetune"
    out = (root / args.out).resolve()
    for previous in ("hiend_mae", "pretrained", "scratch"):
        shutil.rmtree(out / previous, ignore_errors=True)
    weights = out / "hiend_mae" / "models" / "model.pt"
    times = {"pretraining": run_bundle(pretrain, DEMO_CONFIGS, "--ckpt_dir", str(weights.parent),
                                       "--output_dir", str(out / "hiend_mae" / "eval"))}
    held_out = default_dataset(out / "held_out", num=args.held_out, seed=HELD_OUT_PHANTOM_SEED, shape=(96, 96, 96))

    budget = ["--epochs", str(epochs), "--warmup_epochs", str(max(1, epochs // 10)),
              "--val_interval", str(max(1, epochs // 6))]
    source = ["--pretrained#model_path", str(weights)]
    dice = {}
    for start in ("pretrained", "scratch"):
        run_dir = out / start
        network = ["--ckpt_dir", str(run_dir / "models"), "--decoder", args.decoder]
        common = [*network, "--output_dir", str(run_dir / "eval"), "--data_root", str(out / "data"),
                  "--label_count", str(args.labels)]
        times[f"fine-tuning ({start})"] = run_bundle(finetune, DEMO_CONFIGS, *common, *budget,
                                                     *(source if start == "pretrained" else []))
        run_bundle(finetune, EVALUATE_CONFIGS, *network, "--output_dir", str(run_dir / "held_out"),
                   "--dataset_dir", str(held_out), "--num_val", str(args.held_out))
        dice[start] = read_metric(run_dir / "held_out" / "metrics.csv", "val_mean_dice")

    network = "UNETR" if args.decoder == "default" else "linear head"
    print(f"\nMean foreground Dice on {args.held_out} held-out phantoms ({network}, ViT-tiny encoder, "
          f"{args.labels} labelled phantom scan(s), {args.steps} fine-tuning steps for both):")
    print(f"  from Hi-End-MAE pretraining: {dice['pretrained']:.4f}")
    print(f"  from scratch:                {dice['scratch']:.4f}")
    print("Wall time: " + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in times.items()))


if __name__ == "__main__":
    main()
