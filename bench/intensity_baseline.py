"""How far intensity alone segments the study's phantoms: a per-voxel lookup table, no network.

For each seed, the lookup is fitted on the scan the study labels at k = 1 for that seed (the
first training case of ``dataset_seed<seed>.json`` in a study's data folder) and applied to the
held-out test phantoms. Its feature is what seg_finetune feeds its networks, the CT number
clipped to the bundle's ``intensity_range``, optionally averaged over a cubic box; each 5 HU bin
of the feature gets the label most frequent in it on the labelled scan (likelihood times prior,
the Bayes decision for that one feature). Dice per organ is averaged over the test scans, then
over organs, as the study does. The result is a floor that needs no learning of shape or
position: what a fine-tuned network adds to it is what it learnt from context.

    python bench/intensity_baseline.py --data runs/study/small-amp/data
    python bench/intensity_baseline.py --data runs/diag/contrast0 --soft-tissue-contrast 0

With ``--soft-tissue-contrast`` the script first writes the small study's fine-tuning and test
pools into ``--data`` (the same phantom seeds and sizes, the soft tissues' CT numbers scaled by
medssl.data.phantoms) and the study's labelled order for each seed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from study import PRESETS, Preset, labelled_order, phantom_pools  # bench/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
SEG_FINETUNE_CONFIG = ROOT / "bundles/seg_finetune/configs/train.json"
BIN_HU = 5.0


def load_case(folder: Path, case: dict, intensity_range: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """A datalist case as (image clipped to ``intensity_range``, integer label map)."""
    image = nib.load(folder / case["image"]).get_fdata(dtype=np.float32)
    label = np.asarray(nib.load(folder / case["label"]).dataobj).astype(np.int64)
    return np.clip(image, *intensity_range), label


def feature(image: np.ndarray, box: int) -> np.ndarray:
    """The clipped image, averaged over a ``box``³ neighbourhood when ``box`` > 1."""
    return image if box == 1 else ndimage.uniform_filter(image, box)


def bin_index(image: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin of each voxel; values beyond the outer edges fall into the outer bins."""
    return np.clip(np.digitize(image, edges) - 1, 0, len(edges) - 2)


def fit_lookup(image: np.ndarray, label: np.ndarray, edges: np.ndarray, num_classes: int) -> np.ndarray:
    """The most frequent label of each intensity bin (bins without voxels get label 0)."""
    counts = np.zeros((num_classes, len(edges) - 1))
    np.add.at(counts, (label.ravel(), bin_index(image, edges).ravel()), 1)
    return counts.argmax(0)


def organ_dice(prediction: np.ndarray, label: np.ndarray, organs: dict[int, str]) -> dict[str, float]:
    """Dice per organ; an organ absent from both maps is left out (NaN)."""
    dice = {}
    for index, name in organs.items():
        predicted, true = prediction == index, label == index
        total = predicted.sum() + true.sum()
        dice[name] = 2.0 * (predicted & true).sum() / total if total else float("nan")
    return dice


def write_study_pools(data: Path, preset: Preset, seeds: Sequence[int]) -> None:
    """``preset``'s fine-tuning and test pools in ``data``, at its soft-tissue contrast, with each seed's
    labelled order."""
    pools = phantom_pools(preset, data, ("finetune", "test"))
    for seed in seeds:
        labelled_order(pools["finetune"], preset.finetune_num_val, seed)


def evaluate(data: Path, seeds: Sequence[int], boxes: Sequence[int], intensity_range: Sequence[float]) -> list[dict]:
    """One result per (box, seed): the labelled scan, mean Dice and Dice per organ, in points."""
    test_list = json.loads((data / "test/dataset.json").read_text())
    organs = {int(index): name for index, name in test_list["labels"].items() if int(index) > 0}
    tests = [load_case(data / "test", case, intensity_range) for case in test_list["training"]]
    labelled_cases = {seed: json.loads((data / f"finetune/dataset_seed{seed}.json").read_text())["training"][0]
                      for seed in seeds}
    labelled = {case["image"]: load_case(data / "finetune", case, intensity_range) for case in labelled_cases.values()}
    edges = np.arange(intensity_range[0], intensity_range[1] + BIN_HU, BIN_HU)
    results = []
    for box in boxes:
        test_features = [(feature(image, box), label) for image, label in tests]
        for seed, case in labelled_cases.items():
            image, label = labelled[case["image"]]
            lookup = fit_lookup(feature(image, box), label, edges, len(organs) + 1)
            per_scan = [organ_dice(lookup[bin_index(test_image, edges)], test_label, organs)
                        for test_image, test_label in test_features]
            per_organ = {name: 100 * float(np.nanmean([scan[name] for scan in per_scan])) for name in organs.values()}
            results.append({"box": box, "seed": seed, "labelled_scan": Path(case["image"]).name,
                            "mean": float(np.nanmean(list(per_organ.values()))), "organs": per_organ})
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="a study's data folder (runs/study/<size>/data) with finetune/dataset_seed<seed>.json "
                        "and test/dataset.json, written by bench/study.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--boxes", type=int, nargs="+", default=[1, 3, 5], help="averaging box edges, in voxels")
    parser.add_argument("--soft-tissue-contrast", type=float,
                        help="first write the small study's pools into --data with this phantom soft-tissue contrast")
    args = parser.parse_args(argv)
    if args.soft_tissue_contrast is not None:
        preset = replace(PRESETS["small"], soft_tissue_contrast=args.soft_tissue_contrast)
        write_study_pools(args.data, preset, args.seeds)
    for path in (args.data / "test/dataset.json", *(args.data / f"finetune/dataset_seed{s}.json" for s in args.seeds)):
        if not path.is_file():
            parser.error(f"{path} is missing: run bench/study.py (its data folder holds it) or give another --data")
    intensity_range = json.loads(SEG_FINETUNE_CONFIG.read_text())["intensity_range"]
    results = evaluate(args.data, args.seeds, args.boxes, intensity_range)
    organs = list(results[0]["organs"])
    print(f"Intensity lookup on {args.data} (CT numbers clipped to {intensity_range} HU, {BIN_HU:g} HU bins), "
          "Dice points on the test phantoms:")
    print("| box | seed | labelled scan | " + " | ".join(organs) + " | mean |")
    print("|---" * (len(organs) + 4) + "|")
    for result in results:
        cells = " | ".join(f"{result['organs'][name]:.1f}" for name in organs)
        print(f"| {result['box']}³ | {result['seed']} | {result['labelled_scan']} | {cells} | {result['mean']:.1f} |")


if __name__ == "__main__":
    main()
