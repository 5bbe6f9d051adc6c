"""Where a study's fine-tuned networks put one organ's voxels on the held-out phantoms.

A row of the confusion matrix per run: each run's ``models/model.pt`` goes into seg_finetune's
network as the run's ``train.done.json`` recorded it (configs and settings), segments the study's
held-out test phantoms the way the study's evaluation does (the bundle's validation
preprocessing and sliding-window inferer, ``val_datalist`` of ``data/test/dataset.json``), or
with ``--split labelled`` the scans the run was fine-tuned on, and the voxels labelled ``--organ``
are counted by the label each run gives them. A mean Dice of 0 says an organ was missed; this
says what it was taken for, and whether the run learnt it on its own labelled scan.

    python bench/organ_confusion.py --runs runs/study/small-long-pretrain64-amp --organ aorta \\
        --starts scratch_cnn-tiny-64 frepa_cnn
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser

from medssl.data import LABEL_IDS, LABELS

ROOT = Path(__file__).resolve().parents[1]
SEG_FINETUNE = ROOT / "bundles/seg_finetune"


def label_shares(prediction: np.ndarray, label: np.ndarray, organ: int, num_classes: int) -> np.ndarray:
    """Voxel counts (num_classes,) of the labels ``prediction`` gives where ``label`` is ``organ``."""
    return np.bincount(prediction[label == organ].astype(np.int64), minlength=num_classes)[:num_classes]


SPLITS = {  # the scans a run is read on: its config's datalist of them
    "test": "val_datalist",  # the held-out phantoms, as the study's evaluation reads them
    "labelled": "train_datalist",  # the k labelled scans the run was fine-tuned on
}


def run_parser(run: Path, split: str = "test") -> ConfigParser:
    """seg_finetune's config as the run's fine-tuning command was given it (``run`` is
    <runs>/finetune/<start>/k<k>_seed<seed>), its datalists over ``split``'s pool."""
    done = json.loads((run / "train.done.json").read_text())
    words = shlex.split(done["command"].split("&&", 1)[1].rstrip(")"))
    configs = json.loads(words[words.index("--config_file") + 1])
    parser = ConfigParser()
    parser.read_config([str(SEG_FINETUNE / config) for config in configs])
    parser.update({**done["settings"], "bundle_root": str(SEG_FINETUNE), "device": torch.device("cpu")})
    data = run.parents[2] / "data"
    if split == "test":
        test = data / "test" / "dataset.json"
        parser.update({"dataset_dir": str(test), "num_val": len(json.loads(test.read_text())["training"])})
    else:  # the study's labelled order for the run's seed
        parser.update({"dataset_dir": str(data / "finetune" / f"dataset_seed{_seed(run)}.json")})
    return parser


def run_shares(run: Path, organ: int, split: str = "test") -> np.ndarray:
    """Voxel counts per predicted label of ``organ``'s voxels over ``split``'s scans, for one finished run."""
    parser = run_parser(run, split)
    network = parser.get_parsed_content("network_def", instantiate=True)
    network.load_state_dict(torch.load(run / "models" / "model.pt", map_location="cpu", weights_only=True))
    network.eval()
    preprocessing = parser.get_parsed_content("validate#preprocessing", instantiate=True)
    inferer = parser.get_parsed_content("validate#inferer", instantiate=True)
    num_classes = len(parser.get_parsed_content("class_names"))
    counts = np.zeros(num_classes, dtype=np.int64)
    for case in parser.get_parsed_content(SPLITS[split]):
        item = preprocessing(case)
        with torch.no_grad():
            prediction = inferer(item["image"][None], network).argmax(1)[0].numpy()
        counts += label_shares(prediction, item["label"][0].numpy(), organ, num_classes)
    return counts


def _seed(run: Path) -> int:
    return int(run.name.split("seed")[1])


def confusion_markdown(rows: Sequence[tuple[str, int, np.ndarray]], class_names: Sequence[str],
                       organ: str, split: str = "test") -> list[str]:
    """One line per (start, seed, counts): the per-cent of ``organ``'s voxels given each label."""
    lines = [f"| start | seed | {organ} voxels | {' | '.join(class_names)} |",
             "|---|---|---|" + "---|" * len(class_names)]
    for start, seed, counts in rows:
        shares = 100 * counts / max(counts.sum(), 1)
        lines.append(f"| {start} | {seed} | {counts.sum()} | " + " | ".join(f"{share:.0f}" for share in shares) + " |")
    scans = "held-out scans" if split == "test" else "labelled scans each run was fine-tuned on"
    return [f"Per cent of the {organ} voxels of the {scans} that each run gives each label (a row sums to 100; the "
            "organ's own column is its recall).", "", *lines]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="a study's runs folder (runs/study/<size>[-amp])")
    parser.add_argument("--organ", required=True, choices=list(LABEL_IDS)[1:], help="the organ, e.g. aorta")
    parser.add_argument("--starts", nargs="+", required=True, help="start folders under <runs>/finetune")
    parser.add_argument("--split", choices=sorted(SPLITS), default="test",
                        help="test: the held-out phantoms (default); labelled: each run's own labelled scans")
    parser.add_argument("--k", type=int, default=1, help="label count of the runs (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    runs = Path(args.runs)
    organ = LABEL_IDS[args.organ]
    rows = []
    for start in args.starts:
        for folder in sorted((runs / "finetune" / start).glob(f"k{args.k}_seed*"), key=_seed):
            if not (folder / "train.done.json").is_file():  # not finished
                continue
            counts = run_shares(folder, organ, args.split)
            rows.append((start, _seed(folder), counts))
            recall = counts[organ] / max(counts.sum(), 1)
            print(f"{start} {folder.name}: {args.organ} recall {100 * recall:.0f}%", flush=True)
    if not rows:
        parser.error(f"no finished run (train.done.json) of {args.starts} at k = {args.k} under {runs / 'finetune'}")
    print("\n".join(["", *confusion_markdown(rows, [LABELS[index] for index in sorted(LABELS)], args.organ, args.split)]))


if __name__ == "__main__":
    main()
