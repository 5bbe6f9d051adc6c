"""Does self-supervised pretraining beat training from scratch when labels are scarce? (issue #11)

On generated phantom CT scans, with every step a bundle's own MONAI CLI command (printed before it
runs, its log kept beside its outputs):

1. pretrain hiend_mae, maesil and frepa (one run per encoder kind: vit, swin, cnn) on unlabelled
   scans (phantom seed 1000), once per method, each into ``<runs>/pretrain/<method>/``; a
   variant (``VARIANTS``: a method's run with one setting changed, e.g. ``frepa_cnn_no_lfp``,
   Frepa-CNN without its low-frequency perturbation, or ``frepa_cnn_seed1``, Frepa-CNN pretrained
   again from another seed) runs as a method of its own when ``--methods`` names it;
2. fine-tune bundles/seg_finetune from each pretrained encoder, from scratch (the same network)
   and with the pretrained encoder frozen (probing; baseline: the encoder frozen at its random
   initialisation), on k labelled scans of the fine-tuning pool
   (phantom seed 0), with the same budget of optimiser steps for every start and every k; the
   best epoch is chosen on the pool's validation scans;
3. evaluate per-organ Dice (seg_finetune's evaluate.json) on held-out scans (phantom seed 2000)
   that no run trains or selects on; repeat over the preset's seeds (each seed changes the
   fine-tuning initialisation, the crops and which scans are labelled); write mean ± sd tables
   and the k = 1 verdict per method to ``--out``.

Restartable: a step whose ``*.done.json`` exists is skipped, and a bundle run that was cut off
resumes from its own checkpoint, so running the same command again continues the study.
``--methods``, ``--label-counts``, ``--probe-label-counts`` and ``--seeds`` run a part of the grid
into the same runs folder (``--seeds`` beyond the preset's: more repeats of its runs);
``--report-only`` runs nothing and writes the tables from every part done so far.

Beside ``--out`` the study keeps its record (``--out`` with the suffix ``.json``, e.g.
docs/results.json): the settings, each pretraining's command, wall time and weights digest, and
the held-out Dice of every finished run. The runs folder holds weights and scans, which are not
committed; the record is, so a fresh clone rewrites the report and continues the study from it:
runs it records are not run again. A method whose runs still to do need pretraining is
pretrained again; where that gives other weights (another machine), the report says which of
its results came from which pretraining run.

``--amp`` fine-tunes with seg_finetune's ``amp`` (bfloat16 autocast on a CPU, float16 on CUDA):
2-3 times faster UNETR steps on a CPU with native bfloat16 (runs in ``runs/study/<size>-amp``,
its own ``--out``; docs/study_findings.md, E16).

``--decoder linear`` fine-tunes a linear head on the ViT's tokens instead of UNETR (ViT methods
only, runs in ``runs/study/<size>-linear``, its own ``--out``): UNETR's convolutional branch on
the raw image learns organs whatever the encoder holds, the linear head reads only the encoder
(docs/study_findings.md, E6 and E7).

    python bench/study.py --size smoke --out /tmp/study_smoke.md        # minutes: checks the pipeline
    python bench/study.py --size small --out docs/results.md --jobs 2   # hours on 2 CPU cores
    python bench/study.py --size small --decoder linear --out docs/results_linear.md
    python bench/study.py --size small-long --out docs/results_long.md   # 3x the fine-tuning steps, k = 1
    python bench/study.py --size small-isodense --amp --out docs/results_isodense.md  # isodense soft tissue, k = 1
    python bench/study.py --size small-isodense-long --amp --out docs/results_isodense_long.md  # and 360 steps
    python bench/study.py --size small-long-pretrain64 --amp --out docs/results_pretrain64.md  # 64 unlabelled scans
    python bench/study.py --size small-longer-pretrain64 --amp --out docs/results_pretrain64_720.md  # and 720 steps
    python bench/study.py --size paper --out docs/results_paper.md      # GPU sizes
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.demo import HELD_OUT_PHANTOM_SEED, bundle_command, read_metric, repository_root, run_bundle, shown_command
from medssl.encoders import SEGMENTATION_DECODERS, build_segmentation_network
from medssl.zoo import encoder_state

PRETRAIN_PHANTOM_SEED = 1000  # the pretraining bundles' own phantom_seed
FINETUNE_PHANTOM_SEED = 0  # seg_finetune's default phantoms
TEST_PHANTOM_SEED = HELD_OUT_PHANTOM_SEED  # held out as in make demo: evaluated only, never trained or selected on
TARGET_GAIN_POINTS = 3.0  # issue #11: pretrained start ahead of scratch by >= 3 Dice points at k = 1
NETWORK_NAMES = {"vit": "UNETR", "swin": "SwinUNETR", "cnn": "SegResNet"}
DEMO_CONFIGS = ("configs/train.json", "configs/demo.json")
PAPER_CONFIGS = ("configs/train.json",)


@dataclass(frozen=True)
class PhantomPool:
    """``num`` phantom scans of ``shape`` voxels (1.5 mm), generated by medssl.data.default_dataset."""

    num: int
    shape: tuple[int, int, int]


@dataclass(frozen=True)
class Pretraining:
    """One pretraining run: ``bundles/<bundle>`` with ``overrides`` (e.g. Frepa's encoder kind)."""

    name: str
    bundle: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    variant_of: str | None = None  # the method this run repeats with one setting changed


# Frepa builds its encoder with medssl.encoders.build_encoder, so it takes every kind there is.
FREPA_ENCODER_KINDS = ("vit", "swin", "cnn")
PRETRAININGS = (
    Pretraining("hiend_mae", "hiend_mae"),
    Pretraining("maesil", "maesil"),
    *(Pretraining(f"frepa_{kind}", "frepa", {"encoder_kind": kind}) for kind in FREPA_ENCODER_KINDS),
)
# Run only when --methods names them. A variant fine-tunes the network of the method it varies, so
# it leaves a study's settings (and so its records and runs folders) as they are.
VARIANTS = (
    # Frepa-CNN without the low-frequency perturbation (sigma 0: the perturbed view is the clean crop),
    # to tell whether it is what keeps Frepa-CNN's SegResNet from the aorta (docs/study_findings.md, E22).
    Pretraining("frepa_cnn_no_lfp", "frepa", {"encoder_kind": "cnn", "corruption#perturbation_sigma": [0.0, 0.0]},
                variant_of="frepa_cnn"),
    # Frepa-CNN pretrained from another seed (initialisation, crops and corruption draws): whether what its
    # start does to the aorta belongs to the recipe or to the one draw of it (E26 there).
    Pretraining("frepa_cnn_seed1", "frepa", {"encoder_kind": "cnn", "seed": 1}, variant_of="frepa_cnn"),
)
ALL_PRETRAININGS = (*PRETRAININGS, *VARIANTS)


@dataclass(frozen=True)
class Preset:
    """Sizes of one study. Budgets are in optimiser steps (one labelled case, ``crops_per_step``
    crops), the same for every k: seg_finetune's epochs, warm-up and validation interval are
    these divided by k (an epoch over k labelled cases is k steps)."""

    note: str
    pretrain_configs: tuple[str, ...]
    pretrain_overrides: Mapping[str, Mapping[str, Any]]  # pretraining run name -> bundle overrides
    pretrain_pool: PhantomPool
    pretrain_num_val: int
    finetune_configs: tuple[str, ...]
    finetune_pool: PhantomPool
    finetune_num_val: int
    test_pool: PhantomPool
    steps: int
    warmup_steps: int
    val_every: int
    crops_per_step: int
    label_counts: tuple[int, ...]
    probe_label_counts: tuple[int, ...]
    seeds: tuple[int, ...]
    soft_tissue_contrast: float = 1.0  # the phantom generator's, for every pool (1: unenhanced CT)

    def __post_init__(self) -> None:
        if not set(self.probe_label_counts) <= set(self.label_counts):
            raise ValueError(f"probing at k = {self.probe_label_counts} needs scratch runs at the same k: "
                             f"add them to label_counts {self.label_counts}")
        candidates = self.finetune_pool.num - self.finetune_num_val
        for k in set(self.label_counts) | set(self.probe_label_counts):
            if not 1 <= k <= candidates:
                raise ValueError(f"k = {k} labelled scans do not fit the {candidates} training scans "
                                 "of the fine-tuning pool")
            for name in ("steps", "warmup_steps", "val_every"):
                if getattr(self, name) % k:
                    raise ValueError(f"{name} = {getattr(self, name)} is not a multiple of k = {k}: "
                                     "the budget would differ between k")


def _short_run(epochs: int, overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {"epochs": epochs, "val_interval": epochs, "figure_interval": epochs, **overrides}


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        note="smoke preset: 1 seed, k = 1 only, one pretraining epoch and 2 fine-tuning steps on 64³ phantoms. "
        "It checks that every step of the study runs; its numbers say nothing about pretraining.",
        pretrain_configs=DEMO_CONFIGS,
        pretrain_overrides={
            "hiend_mae": _short_run(1, {"warmup_epochs": 0, "roi_size": [32, 32, 32], "num_samples": 2}),
            "maesil": _short_run(1, {"warmup_epochs": 0, "superpatch_size": [32, 32, 32], "num_samples": 2}),
            "frepa_vit": _short_run(1, {"roi_size": [32, 32, 32], "num_samples": 1}),
            # SwinUNETR downstream needs 64³: at 32³ its deepest stage is one voxel, which
            # instance norm refuses in training.
            "frepa_swin": _short_run(1, {"roi_size": [64, 64, 64], "num_samples": 1}),
            "frepa_cnn": _short_run(1, {"roi_size": [32, 32, 32], "num_samples": 1}),
        },
        pretrain_pool=PhantomPool(3, (64, 64, 64)),
        pretrain_num_val=1,
        finetune_configs=DEMO_CONFIGS,
        finetune_pool=PhantomPool(3, (64, 64, 64)),
        finetune_num_val=1,
        test_pool=PhantomPool(2, (64, 64, 64)),
        steps=2,
        warmup_steps=1,
        val_every=2,
        crops_per_step=1,
        label_counts=(1,),
        probe_label_counts=(1,),
        seeds=(0,),
    ),
    "small": Preset(
        note="small preset: the bundles' demo presets (tiny encoders on 64³ crops, MAESIL on 48³ superpatches, "
        "their own epochs but MAESIL's 300) pretrained on 8 phantoms of 96³; 120 fine-tuning steps of two crops "
        "(at 20 or 48 steps both starts had learnt only liver, lung and bone, see docs/study_findings.md).",
        pretrain_configs=DEMO_CONFIGS,
        # MAESIL's demo epochs (30) reconstruct only the mean intensity; it leaves that plateau
        # between epochs 90 and 120 (docs/study_findings.md, E12).
        pretrain_overrides={"maesil": {"epochs": 300, "warmup_epochs": 30, "val_interval": 30, "figure_interval": 30}},
        pretrain_pool=PhantomPool(10, (96, 96, 96)),
        pretrain_num_val=2,
        finetune_configs=DEMO_CONFIGS,
        finetune_pool=PhantomPool(8, (96, 96, 96)),
        finetune_num_val=2,
        test_pool=PhantomPool(4, (96, 96, 96)),
        steps=120,
        warmup_steps=12,
        val_every=40,
        crops_per_step=2,
        label_counts=(1, 2, 4),
        probe_label_counts=(1,),
        seeds=(0, 1, 2),
    ),
    "paper": Preset(
        note="paper preset: every bundle's train.json (the papers' recipes and network sizes) on 62 phantoms "
        "of 128³ for pretraining, 2000 fine-tuning steps of 4 crops (GPU).",
        pretrain_configs=PAPER_CONFIGS,
        pretrain_overrides={},
        pretrain_pool=PhantomPool(64, (128, 128, 128)),
        pretrain_num_val=2,
        finetune_configs=PAPER_CONFIGS,
        finetune_pool=PhantomPool(16, (128, 128, 128)),
        finetune_num_val=4,
        test_pool=PhantomPool(16, (128, 128, 128)),
        steps=2000,
        warmup_steps=100,
        val_every=200,
        crops_per_step=4,
        label_counts=(1, 2, 4),
        probe_label_counts=(1, 2, 4),
        seeds=(0, 1, 2),
    ),
}
# The small preset's curves still rose at 100 steps and no start learnt spleen, kidneys or aorta
# from most labelled scans within 120 (docs/study_findings.md, E1): the same study with three
# times the fine-tuning budget, at k = 1 (its results: E8 there).
PRESETS["small-long"] = replace(
    PRESETS["small"],
    note="small-long preset: the small preset with three times its fine-tuning budget (360 steps of two crops, "
    "warm-up 36, validation every 60) at k = 1 only.",
    steps=360,
    warmup_steps=36,
    val_every=60,
    label_counts=(1,),
)
# At k = 1 and 120 steps every start learnt no more than an intensity lookup gives, plus the lung
# (docs/study_findings.md, E17): the small preset's grid at k = 1 on phantoms whose soft tissues
# all have muscle's CT number, where liver, spleen, kidneys and aorta are told by shape and position
# (its results, and small-isodense-long's: E18 there).
PRESETS["small-isodense"] = replace(
    PRESETS["small"],
    note="small-isodense preset: the small preset at k = 1 on phantoms whose soft tissues are isodense "
    "(soft_tissue_contrast 0: liver, spleen, kidneys, aorta, heart and bowel at muscle's 45 HU; same anatomy).",
    label_counts=(1,),
    soft_tissue_contrast=0.0,
)
PRESETS["small-isodense-long"] = replace(
    PRESETS["small-long"],
    note="small-isodense-long preset: the small-long preset (360 fine-tuning steps, k = 1) on the small-isodense "
    "preset's phantoms.",
    soft_tissue_contrast=0.0,
)
# Self-supervised pretraining is meant for many unlabelled scans; the small presets pretrain on 8
# (results: E19 there).
PRESETS["small-long-pretrain64"] = replace(
    PRESETS["small-long"],
    note="small-long-pretrain64 preset: the small-long preset (360 fine-tuning steps, k = 1) with 64 unlabelled "
    "phantoms of 96³ for pretraining (62 trained on, 2 validated on) instead of 10; each bundle keeps its epochs, "
    "so it pretrains for about 8 times the steps.",
    pretrain_pool=PhantomPool(64, (96, 96, 96)),
)
# Frepa-CNN's start never learnt the aorta in 360 steps (docs/study_findings.md, E21-E23): whether
# twice the fine-tuning budget turns its pretrained shallow filters (results: E24 there).
PRESETS["small-longer-pretrain64"] = replace(
    PRESETS["small-long-pretrain64"],
    note="small-longer-pretrain64 preset: the small-long-pretrain64 preset with twice its fine-tuning budget "
    "(720 steps of two crops, warm-up 72, validation every 120) at k = 1; same pretraining.",
    steps=720,
    warmup_steps=72,
    val_every=120,
)


# Modes whose encoder stays frozen: a pretrained one ("probe"), and one left at its random
# initialisation ("random_probe"), the baseline that shows what probing owes to pretraining.
PROBE_MODES = ("probe", "random_probe")


@dataclass(frozen=True)
class Start:
    """How a fine-tuning run starts: ``mode`` "scratch", "finetune" (pretrained) or one of :data:`PROBE_MODES`."""

    folder: str
    mode: str
    network: Mapping[str, Any]  # seg_finetune settings of the network (kind, size, roi, encoder_args)
    pretraining: str | None = None


@dataclass(frozen=True)
class Step:
    """One bundle command; ``done`` records it once it succeeded."""

    label: str
    bundle: str
    configs: tuple[str, ...]
    overrides: Mapping[str, Any]
    done: Path

    @property
    def log(self) -> Path:
        return self.done.with_suffix("").with_suffix(".log")


@dataclass(frozen=True)
class RunResult:
    """Held-out Dice of one fine-tuning run: per organ, and MONAI's mean over scans and organs."""

    start: Start
    k: int
    seed: int
    organs: Mapping[str, float]
    mean: float


@dataclass
class StudyRecord:
    """The study's record (``<out>.json``): what a report needs once the runs folder is gone.

    ``pretraining`` maps a method to its pretraining runs (command, wall time, machine, sha256 of
    the weights): one, unless the study was continued on a machine whose pretraining gave other
    weights (pretraining is not bit-reproducible across machines). ``runs`` holds one entry per
    finished fine-tuning run: start folder, k, seed, per-organ and mean held-out Dice, wall time
    of its two commands, machine, and the digest of the weights it started from.
    """

    path: Path
    settings: Mapping[str, Any]
    pretraining: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    runs: dict[tuple[str, int, int], dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, settings: Mapping[str, Any]) -> StudyRecord:
        """The record at ``path`` (empty when there is none), refused if it holds other settings."""
        settings = json.loads(json.dumps(settings))  # tuples as lists, as read back
        if not path.is_file():
            return cls(path, settings)
        content = json.loads(path.read_text())
        if comparable_settings(content["settings"]) != settings:
            raise SystemExit(f"{path} records a study of other settings than this one's: give another --out, "
                             "or delete that record (and its report) to start this study over")
        runs = {(run["start"], run["k"], run["seed"]): run for run in content["runs"]}
        return cls(path, settings, content["pretraining"], runs)

    def add_pretraining(self, method: str, weights: Path, done: Mapping[str, Any], machine: str) -> str:
        """Record a pretraining run of ``method`` unless its weights are recorded already; returns their sha256."""
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        recorded = self.pretraining.setdefault(method, [])
        if all(run["weights_sha256"] != digest for run in recorded):
            recorded.append({"command": done["command"], "wall_s": done["wall_s"], "finished": done["finished"],
                             "machine": machine, **_threads(done), "weights_sha256": digest})
        return digest

    def add(self, result: RunResult, done: Sequence[Mapping[str, Any]], machine: str,
            weights_sha256: str | None) -> None:
        """Record one run from the ``*.done.json`` contents of its commands (fine-tuning, evaluation)."""
        self.runs[(result.start.folder, result.k, result.seed)] = {
            "start": result.start.folder, "k": result.k, "seed": result.seed,
            "organs": {organ: _json_number(value) for organ, value in result.organs.items()},
            "mean": _json_number(result.mean), "wall_s": sum(step["wall_s"] for step in done),
            "finished": done[-1]["finished"], "machine": machine, **_threads(done[0]),
            "pretraining_sha256": weights_sha256}

    def thread_settings(self, results: Iterable[RunResult]) -> Counter[str]:
        """How many of the ``results`` were fine-tuned with each OMP_NUM_THREADS setting."""
        settings = Counter()
        for r in results:
            run = self.runs[(r.start.folder, r.k, r.seed)]
            settings["not recorded" if THREADS_KEY not in run else run[THREADS_KEY] or "unset"] += 1
        return settings

    def machines(self, results: Iterable[RunResult], methods: Iterable[str]) -> list[str]:
        """The machines that made ``results`` and the pretraining of ``methods``."""
        found = [self.runs[(r.start.folder, r.k, r.seed)]["machine"] for r in results]
        found += [run["machine"] for method in methods for run in self.pretraining.get(method, [])]
        return sorted(set(found))

    def pretraining_origins(self, results: Iterable[RunResult], method: str) -> Counter[str]:
        """How many of the ``results`` of ``method`` started from each of its pretrained weights (by sha256)."""
        return Counter(self.runs[(r.start.folder, r.k, r.seed)]["pretraining_sha256"]
                       for r in results if r.start.pretraining == method)

    def results(self, plan: Iterable[tuple[Start, int, int]]) -> list[RunResult]:
        """The recorded results of the runs in ``plan``."""
        found = []
        for start, k, seed in plan:
            run = self.runs.get((start.folder, k, seed))
            if run is not None:
                organs = {organ: _float(value) for organ, value in run["organs"].items()}
                found.append(RunResult(start, k, seed, organs, _float(run["mean"])))
        return found

    def save(self) -> None:
        runs = [self.runs[key] for key in sorted(self.runs)]
        content = {"settings": self.settings, "pretraining": dict(sorted(self.pretraining.items())), "runs": runs}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(content, indent=1, ensure_ascii=False) + "\n")


THREADS_KEY = "omp_num_threads"  # a bundle command's OMP_NUM_THREADS (null: unset), in its *.done.json
SETTINGS_KEY = "settings"  # a bundle command's overrides, less absolute paths, in its *.done.json


def _threads(done: Mapping[str, Any]) -> dict[str, str | None]:
    """The thread setting of a ``*.done.json`` record, as a record entry; nothing where it predates them."""
    return {THREADS_KEY: done[THREADS_KEY]} if THREADS_KEY in done else {}


def _json_number(value: float) -> float | None:
    """NaN (an organ absent from every evaluated scan) as JSON's null."""
    return None if math.isnan(value) else value


def _float(value: float | None) -> float:
    return math.nan if value is None else float(value)


# ----------------------------------------------------------------------------- commands


def config_list(configs: Sequence[str]) -> str:
    """``--config_file`` value merging ``configs`` in order."""
    return json.dumps(list(configs), separators=(",", ":"))


def cli_overrides(overrides: Mapping[str, Any]) -> list[str]:
    """``--key value`` pairs for MONAI's CLI (python-fire parses lists, dicts and booleans)."""
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return args


def step_settings(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A step's overrides as its *.done.json keeps them, less the absolute paths (a moved runs folder keeps its runs)."""
    settings = json.loads(json.dumps(dict(overrides), default=str))
    return {key: value for key, value in settings.items() if not (isinstance(value, str) and os.path.isabs(value))}


def run_step(step: Step, root: Path) -> tuple[float, bool]:
    """Run ``step`` unless it is done; returns (its wall time in seconds, whether it ran now).

    A done step whose recorded settings differ from this one's is refused, naming them: its
    outputs belong to another study.
    """
    if step.done.is_file():
        done = json.loads(step.done.read_text())
        recorded, planned = done.get(SETTINGS_KEY), step_settings(step.overrides)
        if recorded is not None and recorded != planned:
            changed = ", ".join(f"{key}: {recorded.get(key)!r} -> {planned.get(key)!r}"
                                for key in sorted(recorded.keys() | planned.keys())
                                if recorded.get(key) != planned.get(key))
            raise SystemExit(f"{step.done} was written by a run with other settings ({changed}): delete "
                             f"{step.done.parent} to run it again with these, or give the study another --runs folder")
        return float(done["wall_s"]), False
    bundle = root / "bundles" / step.bundle
    args = cli_overrides(step.overrides)
    wall = run_bundle(bundle, config_list(step.configs), *args, log=step.log)
    record = {
        "command": shown_command(bundle, bundle_command(config_list(step.configs), *args)),
        "wall_s": wall,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        THREADS_KEY: os.environ.get("OMP_NUM_THREADS"),  # the bundle process inherits it
        SETTINGS_KEY: step_settings(step.overrides),
    }
    step.done.write_text(json.dumps(record, indent=1) + "\n")
    return wall, True


@dataclass
class Ledger:
    """Wall times of the steps run now and of those done before (thread-safe), with a progress line each."""

    total: int
    ran: list[float] = field(default_factory=list)
    reused: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, step: Step, wall: float, ran: bool) -> None:
        with self.lock:
            (self.ran if ran else self.reused).append(wall)
            state = f"{wall / 60:.1f} min" if ran else "done before, skipped"
            print(f"[{len(self.ran) + len(self.reused)}/{self.total}] {step.label}: {state}", flush=True)


@dataclass(frozen=True)
class Chain:
    """Steps run in order, not before the step ``after`` (a pretraining) has finished."""

    steps: tuple[Step, ...]
    after: Step | None = None


def run_chains(chains: Sequence[Chain], root: Path, jobs: int, ledger: Ledger) -> None:
    """Run the chains ``jobs`` at a time; stop at the first failure.

    Each free worker takes the first chain in ``chains`` that waits for nothing unfinished, so the
    fine-tuning runs that need no pretraining fill the cores while the pretrainings run, and a
    method's runs start as soon as its own pretraining is done.
    """
    pending, finished, failures = list(chains), set(), []
    changed = threading.Condition()

    def next_chain() -> Chain | None:
        with changed:
            while pending and not failures:
                ready = next((c for c in pending if c.after is None or c.after.done in finished), None)
                if ready is not None:
                    pending.remove(ready)
                    return ready
                changed.wait()
            return None

    def work() -> None:
        while (chain := next_chain()) is not None:
            try:
                for step in chain.steps:
                    ledger.record(step, *run_step(step, root))
            except BaseException as error:  # SystemExit too: a done step of other settings
                with changed:
                    failures.append(error)
                    changed.notify_all()
                return
            with changed:
                finished.add(chain.steps[-1].done)
                changed.notify_all()

    workers = [threading.Thread(target=work, name=f"study-{i}") for i in range(jobs)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if failures:
        raise failures[0]


# ----------------------------------------------------------------------------- data


def phantom_pools(preset: Preset, data_dir: Path,
                  names: Sequence[str] = ("pretrain", "finetune", "test")) -> dict[str, Path]:
    """Generate (or reuse) the phantom pools ``names``; returns their dataset.json paths."""
    from medssl.data import default_dataset

    pools = {
        "pretrain": (preset.pretrain_pool, PRETRAIN_PHANTOM_SEED),
        "finetune": (preset.finetune_pool, FINETUNE_PHANTOM_SEED),
        "test": (preset.test_pool, TEST_PHANTOM_SEED),
    }
    paths = {}
    for name in names:
        pool, seed = pools[name]
        paths[name] = default_dataset(data_dir / name, num=pool.num, seed=seed, shape=pool.shape,
                                      soft_tissue_contrast=preset.soft_tissue_contrast)
        print(f"{name} phantoms: {pool.num} scans of {pool.shape} voxels, phantom seed {seed}, soft-tissue contrast "
              f"{preset.soft_tissue_contrast:g}: {paths[name]}", flush=True)
    return paths


def labelled_order(pool_json: Path, num_val: int, seed: int) -> Path:
    """A copy of the fine-tuning pool's dataset.json whose training cases come in a seeded order.

    seg_finetune labels the first k training cases (label_count) and validates on the last
    ``num_val``; shuffling all but those last cases gives each seed its own labelled scans while
    the validation scans stay the same.
    """
    content = json.loads(pool_json.read_text())
    cases = content["training"]
    candidates, validation = cases[: len(cases) - num_val], cases[len(cases) - num_val:]
    order = np.random.default_rng(seed).permutation(len(candidates))
    shuffled = {
        "name": content["name"],
        "description": f"{pool_json.name} with its first {len(candidates)} cases shuffled by seed {seed}; "
        f"the last {num_val} cases (validation) in place",
        "labels": content["labels"],
        "training": [candidates[i] for i in order] + validation,
    }
    path = pool_json.with_name(f"dataset_seed{seed}.json")
    path.write_text(json.dumps(shuffled, indent=1) + "\n")
    return path


# ----------------------------------------------------------------------------- plan


def bundle_config(root: Path, bundle: str, configs: Sequence[str], overridden: Iterable[str]):
    """The bundle's merged config (MONAI's ConfigParser), checked to hold every key the study overrides."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(root / "bundles" / bundle / name) for name in configs])
    missing = sorted(key for key in set(overridden) if key not in parser)
    if missing:
        raise SystemExit(f"bundles/{bundle} {config_list(configs)} has no key {missing}, which the study overrides: "
                         f"add it to the bundle's config, or change the study's settings in {Path(__file__).name}")
    return parser


def check_overrides(root: Path, steps: Iterable[Step]) -> None:
    """Before anything runs: every key the steps override exists in their bundle's configs."""
    keys: dict[tuple[str, tuple[str, ...]], set[str]] = {}
    for step in steps:
        keys.setdefault((step.bundle, step.configs), set()).update(step.overrides)
    for (bundle, configs), names in keys.items():
        bundle_config(root, bundle, configs, names)


def finetune_network(run: Pretraining, settings) -> dict[str, Any]:
    """seg_finetune settings of the network that takes this run's encoder exactly
    (bundles/seg_finetune/docs/README.md, "Fine-tuning from each pretraining bundle")."""
    value = settings.get_parsed_content
    if run.bundle == "hiend_mae":
        return {"network_kind": "vit", "encoder_size": value("encoder_size"), "roi_size": list(value("roi_size")),
                "encoder_args": {}}
    if run.bundle == "maesil":
        encoder_args = {"patch_size": value("patch_size"), "num_layers": value("encoder_layers"),
                        "num_heads": value("encoder_heads")}
        return {"network_kind": "vit", "encoder_size": value("encoder_size"),
                "roi_size": list(value("superpatch_size")), "encoder_args": encoder_args}
    if run.bundle == "frepa":
        return {"network_kind": value("encoder_kind"), "encoder_size": value("encoder_size"),
                "roi_size": list(value("roi_size")), "encoder_args": dict(value("encoder_args"))}
    raise ValueError(f"no seg_finetune network known for bundle {run.bundle!r}")


def pretraining_plan(root: Path, preset: Preset, runs: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """Overrides of every pretraining run (all but its data) and the seg_finetune network matching each."""
    overrides, networks = {}, {}
    for run in ALL_PRETRAININGS:
        folder = runs / "pretrain" / run.name
        overrides[run.name] = {
            "bundle_root": str(folder), "ckpt_dir": str(folder / "models"), "output_dir": str(folder / "eval"),
            "num_val": preset.pretrain_num_val, **run.overrides,
            **preset.pretrain_overrides.get(run.variant_of or run.name, {})}
        config = bundle_config(root, run.bundle, preset.pretrain_configs, [*overrides[run.name], "dataset_dir"])
        config.update(overrides[run.name])
        networks[run.name] = finetune_network(run, config)
        if run.variant_of and networks[run.name] != networks[run.variant_of]:
            raise ValueError(f"variant {run.name} would fine-tune {networks[run.name]}, not {run.variant_of}'s "
                             f"{networks[run.variant_of]}: its overrides must leave the encoder as it is")
    return overrides, networks


def with_decoder(networks: Mapping[str, Mapping[str, Any]], decoder: str) -> dict[str, dict[str, Any]]:
    """The networks with seg_finetune's ``decoder``: "default" keeps them all, "linear" (a linear head on
    the tokens) keeps the ViT ones."""
    if decoder == "default":
        return {name: dict(network) for name, network in networks.items()}
    return {name: {**network, "decoder": decoder} for name, network in networks.items()
            if network["network_kind"] == "vit"}


def network_label(network: Mapping[str, Any]) -> str:
    """Short folder-safe name of a network, e.g. ``vit-tiny-64`` or ``vit-tiny-48-patch_size8-num_layers4``
    (``-linear`` appended for the linear decoder)."""
    roi = network["roi_size"]
    crop = str(roi[0]) if len(set(roi)) == 1 else "x".join(map(str, roi))
    extra = "".join(f"-{key}{value}" for key, value in sorted(network["encoder_args"].items()))
    decoder = "" if network.get("decoder", "default") == "default" else f"-{network['decoder']}"
    return f"{network['network_kind']}-{network['encoder_size']}-{crop}{extra}{decoder}"


def _volume(shape: Sequence[int]) -> str:
    """e.g. ``96³`` or ``96×96×64``."""
    return f"{shape[0]}³" if len(set(shape)) == 1 else "×".join(map(str, shape))


def describe_network(network: Mapping[str, Any]) -> str:
    """e.g. ``UNETR (vit-tiny, patch_size 8, num_layers 4), 48³ crops``."""
    kind, roi = network["network_kind"], network["roi_size"]
    extra = "".join(f", {key} {value}" for key, value in sorted(network["encoder_args"].items()))
    name = NETWORK_NAMES[kind] if network.get("decoder", "default") == "default" else "ViT + linear head"
    precision = ", amp (bfloat16 autocast on the CPU)" if network.get("amp") else ""
    return f"{name} ({kind}-{network['encoder_size']}{extra}), {_volume(roi)} crops{precision}"


def scratch_start(network: Mapping[str, Any]) -> Start:
    """The start from scratch of ``network`` (seg_finetune settings), one per distinct network."""
    return Start(f"scratch_{network_label(network)}", "scratch", network)


def plan_starts(networks: Mapping[str, Mapping[str, Any]]) -> list[Start]:
    """Scratch once per distinct network, then each pretraining fine-tuned and probed, then each distinct
    network probed with its encoder frozen at its random initialisation."""
    starts, scratch = [], {}
    for network in networks.values():
        label = network_label(network)
        if label not in scratch:
            scratch[label] = scratch_start(network)
            starts.append(scratch[label])
    for name, network in networks.items():
        starts.append(Start(name, "finetune", network, name))
        starts.append(Start(f"{name}_probe", "probe", network, name))
    starts += [Start(f"random_probe_{label}", "random_probe", start.network) for label, start in scratch.items()]
    return starts


def random_encoder_path(runs: Path, start: Start, seed: int) -> Path:
    return runs / "random_encoders" / start.folder / f"seed{seed}.pt"


def random_encoder_state(network: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """The encoder of ``network`` (seg_finetune settings) as initialised under ``seed`` (what the bundle's run of
    that seed starts from), in a pretraining model.pt's naming."""
    with torch.random.fork_rng():  # the study's own random state stays as it was
        torch.manual_seed(seed)
        built = build_segmentation_network(network["network_kind"], network["encoder_size"],
                                           img_size=network["roi_size"], encoder_args=network["encoder_args"],
                                           decoder=network.get("decoder", "default"))
    return encoder_state(built, network["network_kind"])


def write_random_encoder(network: Mapping[str, Any], path: Path, seed: int) -> None:
    """:func:`random_encoder_state` saved to ``path``: the frozen encoder of the random-probe baseline
    (seg_finetune freezes only a loaded one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_encoder_state(network, seed), path)


def finetune_chain(preset: Preset, start: Start, k: int, seed: int, runs: Path, data: Mapping[str, Path],
                   weights: Mapping[str, Path]) -> list[Step]:
    """Fine-tune then evaluate on the held-out scans: the two seg_finetune commands of one run."""
    folder = runs / "finetune" / start.folder / f"k{k}_seed{seed}"
    source = {}
    if start.pretraining is not None:
        source["pretrained#model_path"] = str(weights[start.pretraining])
    elif start.mode == "random_probe":
        source["pretrained#model_path"] = str(random_encoder_path(runs, start, seed))
    if start.mode in PROBE_MODES:
        source["freeze_encoder"] = True
    common = {"bundle_root": str(folder), "ckpt_dir": str(folder / "models"), "seed": seed, **start.network}
    train = {
        **common,
        "output_dir": str(folder / "eval"),
        "dataset_dir": str(data[f"finetune_seed{seed}"]),
        "num_val": preset.finetune_num_val,
        "label_count": k,
        "num_samples": preset.crops_per_step,
        "epochs": preset.steps // k,
        "warmup_epochs": preset.warmup_steps // k,
        "val_interval": preset.val_every // k,
        **source,
    }
    evaluate = {**common, "output_dir": str(folder / "test"), "dataset_dir": str(data["test"]),
                "num_val": preset.test_pool.num}
    label = f"{start.folder} k={k} seed={seed}"
    return [
        Step(f"fine-tune {label}", "seg_finetune", preset.finetune_configs, train, folder / "train.done.json"),
        Step(f"evaluate {label}", "seg_finetune", (*preset.finetune_configs, "configs/evaluate.json"), evaluate,
             folder / "test.done.json"),
    ]


def fine_tuning_runs(preset: Preset | Selection, starts: Sequence[Start]) -> list[tuple[Start, int, int]]:
    """(start, k, seed) of every fine-tuning run, seed-major so that a partial study covers every start."""
    runs = []
    for seed in preset.seeds:
        for k in sorted(set(preset.label_counts) | set(preset.probe_label_counts)):
            for start in starts:
                counts = preset.probe_label_counts if start.mode in PROBE_MODES else preset.label_counts
                if k in counts:
                    runs.append((start, k, seed))
    return runs


# ----------------------------------------------------------------------------- results


def organ_dice(raw_csv: Path) -> dict[str, float]:
    """Mean Dice per organ over the evaluated scans, from MetricsSaver's ``val_mean_dice_raw.csv``."""
    with open(raw_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise SystemExit(f"{raw_csv} has no evaluated scans; delete its run folder's test.done.json and run again")
    organs = [name for name in rows[0] if name not in ("filename", "mean")]
    return {organ: _nanmean(float(row[organ]) for row in rows) for organ in organs}


def _nanmean(values: Iterable[float]) -> float:
    present = [value for value in values if not math.isnan(value)]
    return statistics.fmean(present) if present else math.nan


def read_result(folder: Path, start: Start, k: int, seed: int) -> RunResult:
    test = folder / "test"
    return RunResult(start, k, seed, organ_dice(test / "val_mean_dice_raw.csv"),
                     read_metric(test / "metrics.csv", "val_mean_dice"))


def mean_sd(values: Sequence[float]) -> str:
    """Dice values (0-1) as points: "mean ± sd (sample sd, over the values)", the mean alone for one value."""
    points = [100 * value for value in values if not math.isnan(value)]
    if not points:
        return "n/a"
    if len(points) == 1:
        return f"{points[0]:.1f}"
    return f"{statistics.fmean(points):.1f} ± {statistics.stdev(points):.1f}"


def paired_gains(results: Sequence[RunResult], start: Start, baseline: Start, k: int) -> list[float]:
    """``start`` minus ``baseline`` mean Dice at k, per seed that both have (same labelled scans, same seed)."""
    base = {r.seed: r.mean for r in results if r.start == baseline and r.k == k}
    return [r.mean - base[r.seed] for r in results if r.start == start and r.k == k and r.seed in base]


def baseline_of(start: Start, starts: Sequence[Start], mode: str = "scratch") -> Start:
    """The start of ``mode`` (a baseline: "scratch" or "random_probe") with the same network as ``start``."""
    return next(s for s in starts if s.mode == mode and s.network == start.network)


def _values(results: Sequence[RunResult], start: Start, k: int, key: Callable[[RunResult], float]) -> list[float]:
    return [key(r) for r in sorted(results, key=lambda r: r.seed) if r.start == start and r.k == k]


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def verdict(results: Sequence[RunResult], starts: Sequence[Start], pretraining: str) -> str:
    """The k = 1 paragraph of one method: its measured Dice, scratch's, the paired gain, target met or not."""
    tuned = next(s for s in starts if s.pretraining == pretraining and s.mode == "finetune")
    probe = next(s for s in starts if s.pretraining == pretraining and s.mode == "probe")
    scratch = baseline_of(tuned, starts)
    gains = paired_gains(results, tuned, scratch, 1)
    if not gains:
        return f"**{pretraining}**: k = 1 was not measured in this run (no pair of fine-tuned and scratch results)."
    mean_gain = 100 * statistics.fmean(gains)
    seeds = f"{len(gains)} seed{'s' if len(gains) > 1 else ''}"
    spread = f", sd {100 * statistics.stdev(gains):.2f}" if len(gains) > 1 else ""
    text = (f"**{pretraining}**: at k = 1, fine-tuned from its pretraining "
            f"{mean_sd(_values(results, tuned, 1, _mean))} vs {mean_sd(_values(results, scratch, 1, _mean))} "
            f"from scratch ({describe_network(tuned.network)}); "
            f"mean paired gain {mean_gain:+.2f} Dice points ({seeds}{spread}): the ≥ {TARGET_GAIN_POINTS:g}-point "
            f"target is {'met' if mean_gain >= TARGET_GAIN_POINTS else 'not met'}.")
    probe_gains = paired_gains(results, probe, scratch, 1)
    if probe_gains:
        text += (f" Frozen encoder (probing): {mean_sd(_values(results, probe, 1, _mean))}, "
                 f"{mean_sd(probe_gains)} points against scratch")
        random_probe = baseline_of(probe, starts, "random_probe")
        over_random = paired_gains(results, probe, random_probe, 1)
        if over_random:
            text += (f", {mean_sd(over_random)} against the encoder frozen at its random initialisation "
                     f"({mean_sd(_values(results, random_probe, 1, _mean))})")
        text += "."
    return text


def _mean(result: RunResult) -> float:
    return result.mean


def _seeds_cell(values: Sequence[float], seeds: Sequence[int]) -> str:
    """``mean_sd`` of the values, saying how many seeds they are when some but not all of ``seeds``."""
    count = sum(not math.isnan(value) for value in values)
    return mean_sd(values) + (f" ({count} of {len(seeds)} seeds)" if 1 < count < len(seeds) else "")


def results_markdown(results: Sequence[RunResult], starts: Sequence[Start], preset: Preset | Selection) -> list[str]:
    """The tables and the per-method verdicts (everything in them computed from ``results``)."""
    counts = sorted(set(preset.label_counts) | set(preset.probe_label_counts))
    pretrainings = [s.pretraining for s in starts if s.mode == "finetune"]
    lines = ["## Mean foreground Dice on the held-out scans", "",
             f"Dice points (0-100), mean ± sample sd over seeds {list(preset.seeds)}; 'n/a': not run. "
             "Mean over the held-out scans of MONAI's MeanDice (foreground organs).", ""]
    rows = []
    for start in starts:
        cells = [_seeds_cell(_values(results, start, k, _mean), preset.seeds) for k in counts]
        rows.append([start.folder, start.mode, describe_network(start.network), *cells])
    lines += _table(["start", "mode", "network", *(f"k = {k}" for k in counts)], rows)

    lines += ["", "## Gain over scratch (Dice points, paired by seed: same network, labelled scans and seed)", ""]
    rows = []
    for start in starts:
        if start.mode == "scratch":
            continue
        baseline = baseline_of(start, starts)
        rows.append([start.folder, start.mode,
                     *(_seeds_cell(paired_gains(results, start, baseline, k), preset.seeds) for k in counts)])
    lines += _table(["start", "mode", *(f"k = {k}" for k in counts)], rows)

    if preset.probe_label_counts:
        lines += ["", "## Frozen pretrained encoder vs the same encoder frozen at its random initialisation "
                  "(Dice points, paired by seed)", "",
                  "What probing owes to pretraining: the trainable parts of the network are the same in both.", ""]
        rows = []
        for start in starts:
            if start.mode == "probe":
                baseline = baseline_of(start, starts, "random_probe")
                rows.append([start.folder, *(_seeds_cell(paired_gains(results, start, baseline, k), preset.seeds)
                                             for k in preset.probe_label_counts)])
        lines += _table(["start", *(f"k = {k}" for k in preset.probe_label_counts)], rows)

    for k in counts:
        organs = next((list(r.organs) for r in results if r.k == k), [])
        if not organs:
            continue
        lines += ["", f"## Per-organ Dice, k = {k} (points, mean ± sd over seeds)", ""]
        rows = []
        for start in starts:
            cells = [mean_sd(_values(results, start, k, lambda r, organ=organ: r.organs.get(organ, math.nan)))
                     for organ in organs]
            if any(cell != "n/a" for cell in cells):
                rows.append([start.folder, *cells, mean_sd(_values(results, start, k, _mean))])
        lines += _table(["start", *organs, "mean"], rows)

    lines += ["", f"## Target: pretrained start ≥ {TARGET_GAIN_POINTS:g} Dice points above scratch at k = 1", "",
              "The target is judged on the mean paired gain; the sd shows how much it moves between seeds.", ""]
    for pretraining in pretrainings:
        lines += [f"- {verdict(results, starts, pretraining)}"]
    return lines


# ----------------------------------------------------------------------------- report


def machine_description() -> str:
    """The machine and software a run was made with (its thread settings are the invocation's)."""
    import monai

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, MONAI {monai.__version__}, "
            f"device {device}")


def setup_markdown(preset: Preset, record: StudyRecord, results: Sequence[RunResult],
                   networks: Mapping[str, Mapping[str, Any]], selected: Selection,
                   report_only: bool = False) -> list[str]:
    """What was run: data pools, pretraining runs (the record's) and the fine-tuning protocol."""
    finetune_candidates = preset.finetune_pool.num - preset.finetune_num_val
    validation = (f"validation every {preset.val_every} steps, the best validated epoch evaluated"
                  if preset.val_every < preset.steps
                  else "one validation after the last step, the final model evaluated")
    lines = [
        "## Setup", "",
        f"- {preset.note}",
        f"- Pretraining data: {preset.pretrain_pool.num} phantoms of {_volume(preset.pretrain_pool.shape)} "
        f"(phantom seed {PRETRAIN_PHANTOM_SEED}; the last {preset.pretrain_num_val} validate the pretraining loss), "
        "images only.",
        f"- Fine-tuning data: {preset.finetune_pool.num} labelled phantoms of {_volume(preset.finetune_pool.shape)} "
        f"(phantom seed {FINETUNE_PHANTOM_SEED}); the last {preset.finetune_num_val} are seg_finetune's validation "
        f"scans (they pick the validated epoch that is evaluated), the first k of the other "
        f"{finetune_candidates} train, in an order shuffled by the seed (`dataset_seed<seed>.json`).",
        f"- Held-out data: {preset.test_pool.num} phantoms of {_volume(preset.test_pool.shape)} (phantom seed "
        f"{TEST_PHANTOM_SEED}), used only by "
        "seg_finetune's evaluate.json after training.",
        f"- Every pool at the phantom generator's soft-tissue contrast {preset.soft_tissue_contrast:g} "
        "(1: unenhanced CT numbers; 0: the soft tissues all at muscle's).",
        f"- Fine-tuning: bundles/seg_finetune `{config_list(preset.finetune_configs)}`, {preset.steps} optimiser steps "
        f"of one labelled scan × {preset.crops_per_step} crops for every k (epochs = {preset.steps} / k), warm-up "
        f"{preset.warmup_steps} steps, {validation}; label counts k = "
        f"{list(preset.label_counts)}, frozen-encoder probing at k = {list(preset.probe_label_counts)} (each "
        "pretrained encoder, and each network's encoder frozen at its random initialisation); seeds "
        f"{list(preset.seeds)} by default (fine-tuning initialisation, crops, labelled scans).",
        "- Each method is pretrained once (the bundles' seed 0) and every fine-tuning run of it starts from those "
        "weights, so the sd over seeds does not include the variation between pretraining runs, except for a "
        "method whose results below came from several pretraining runs (said under its commands).",
        f"- This invocation {'collected the finished runs of' if report_only else 'ran'} methods "
        f"{list(selected.methods)}, k = {list(selected.label_counts)}, probing at k = "
        f"{list(selected.probe_label_counts)}, seeds {list(selected.seeds)}; any other cell of the tables reads n/a, "
        "and a cell without ± holds one seed.",
        "", "Pretraining commands (from the repository root), each with its wall time:", "",
    ]
    for method in selected.methods:
        lines += [f"- `{run['command']}` ({duration(run['wall_s'])}; weights sha256 {run['weights_sha256'][:12]})"
                  for run in record.pretraining.get(method, [])]
        origins = record.pretraining_origins(results, method)
        if len(origins) > 1:
            counts = ", ".join(f"{count} from {digest[:12]}" for digest, count in sorted(origins.items()))
            lines.append(f"  - {method}'s results came from {len(origins)} pretraining runs of this command on "
                         f"different machines ({counts}); its sd includes the variation between them.")
    lines += ["", "Fine-tuned networks (seg_finetune settings matching each pretraining run's encoder):", ""]
    lines += [f"- {name}: {describe_network(network)}" for name, network in networks.items()]
    return lines


def display_path(path: Path, root: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def write_report(out: Path, header: Sequence[str], body: Sequence[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([*header, "", *body]) + "\n")
    print(f"\nwrote {out}", flush=True)


# ----------------------------------------------------------------------------- main


@dataclass(frozen=True)
class Selection:
    """The part of a preset's grid one invocation runs (``--methods``, ``--label-counts``, ...)."""

    methods: tuple[str, ...]
    label_counts: tuple[int, ...]
    probe_label_counts: tuple[int, ...]
    seeds: tuple[int, ...]


def run_selection(parser: argparse.ArgumentParser, preset: Preset, args: argparse.Namespace) -> Selection:
    """The preset's grid, narrowed by the command line; a value outside the preset is an error, except
    seeds: seeds beyond the preset's repeat its runs more times."""
    def narrowed(given: Sequence | None, full: Sequence, option: str) -> tuple:
        if given is None:
            return tuple(full)
        unknown = sorted(set(given) - set(full))
        if unknown:
            parser.error(f"{option} {unknown} is not in the {args.size} preset's {list(full)}")
        return tuple(value for value in full if value in given)

    return Selection(
        methods=(tuple(run.name for run in PRETRAININGS) if args.methods is None
                 else narrowed(args.methods, [run.name for run in ALL_PRETRAININGS], "--methods")),
        label_counts=narrowed(args.label_counts, preset.label_counts, "--label-counts"),
        probe_label_counts=narrowed(args.probe_label_counts, preset.probe_label_counts, "--probe-label-counts"),
        seeds=preset.seeds if args.seeds is None else tuple(sorted(set(args.seeds))),
    )


# The grid's axes: every run is kept under its own k and seed, so the preset's lists of them say which
# runs a study makes by default, not how a run is made, and widening them leaves every run comparable.
GRID_AXES = ("label_counts", "probe_label_counts", "seeds")


def study_settings(size: str, preset: Preset, networks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What makes two studies comparable: the size, the preset's numbers (not its note nor its grid's axes)
    and the networks; a variant's network is its method's (pretraining_plan checks it), so it is left out."""
    numbers = {key: value for key, value in asdict(preset).items() if key != "note"}
    variants = {run.name for run in VARIANTS}
    networks = {name: network for name, network in networks.items() if name not in variants}
    return comparable_settings({"size": size, "networks": networks, "preset": numbers})


def comparable_settings(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """Settings less the grid's axes (records written before GRID_AXES kept them)."""
    preset = {key: value for key, value in recorded["preset"].items() if key not in GRID_AXES}
    return {**recorded, "preset": preset}


def guard_settings(runs: Path, settings: Mapping[str, Any]) -> None:
    """Refuse to mix results of other settings into a runs folder; record the settings on first use."""
    record = runs / "study.json"
    current = json.loads(json.dumps(settings))  # tuples as lists, as read back
    if record.is_file() and comparable_settings(json.loads(record.read_text())) != current:
        raise SystemExit(f"{record} records other study settings than this run's: give another --runs folder, "
                         f"or delete {runs} to start this study over")
    runs.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(current, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(PRESETS), default="small", help="study size (default small)")
    parser.add_argument("--out", required=True, help="Markdown file of the results (e.g. docs/results.md)")
    parser.add_argument("--runs", help="folder of the runs (default runs/study/<size> in the repository)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="bundle runs at a time (default 1; runs that need no pretraining start beside the "
                             "pretrainings); with more than one and OMP_NUM_THREADS unset, each gets cpu_count / jobs "
                             "threads")
    parser.add_argument("--methods", nargs="+", choices=[run.name for run in ALL_PRETRAININGS],
                        help="run only these pretraining methods (default all but the variants, which run only "
                             "when named); the rest of the tables reads n/a")
    parser.add_argument("--label-counts", nargs="+", type=int,
                        help="run only these of the preset's label counts k (default all)")
    parser.add_argument("--probe-label-counts", nargs="*", type=int,
                        help="run frozen-encoder probing only at these of the preset's k (default all; none: no probing)")
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="run these seeds (default the preset's); seeds beyond the preset's add repeats of "
                             "the same runs; a mean over fewer seeds than given says so")
    parser.add_argument("--decoder", choices=SEGMENTATION_DECODERS, default="default",
                        help="seg_finetune's decoder: default (UNETR, SwinUNETR, SegResNet) or linear (a linear head "
                             "on the ViT's tokens, ViT methods only; runs in runs/study/<size>-linear by default; "
                             "give it an --out of its own)")
    parser.add_argument("--amp", action="store_true",
                        help="fine-tune and evaluate with seg_finetune's amp: bfloat16 autocast on the CPU (fast where "
                             "it computes bfloat16 natively), float16 on CUDA; runs in runs/study/<size>-amp by "
                             "default; give it an --out of its own")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write --out from every run of the narrowed grid that is already done")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.jobs > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))

    started = time.perf_counter()
    root = repository_root()
    preset = PRESETS[args.size]
    selected = run_selection(parser, preset, args)
    folder = args.size + ("" if args.decoder == "default" else f"-{args.decoder}") + ("-amp" if args.amp else "")
    runs = Path(args.runs).resolve() if args.runs else root / "runs" / "study" / folder
    out = Path(args.out).resolve()
    script = Path(__file__).resolve().relative_to(root)
    command = shlex.join(["python", str(script), *(sys.argv[1:] if argv is None else argv)])
    print(f"study {args.size}: {preset.note}\nruns in {runs}", flush=True)

    pretrain_overrides, networks = pretraining_plan(root, preset, runs)
    networks = with_decoder(networks, args.decoder)
    if args.amp:
        networks = {name: {**network, "amp": True} for name, network in networks.items()}
    unsupported = sorted(set(args.methods or ()) - set(networks))
    if unsupported:
        parser.error(f"--decoder {args.decoder} needs a ViT encoder; {unsupported} have none")
    selected = replace(selected, methods=tuple(method for method in selected.methods if method in networks))
    settings = study_settings(args.size, preset, networks)
    guard_settings(runs, settings)
    record = StudyRecord.open(out.with_suffix(".json"), settings)

    data = phantom_pools(preset, runs / "data")
    for seed in selected.seeds:
        data[f"finetune_seed{seed}"] = labelled_order(data["finetune"], preset.finetune_num_val, seed)
    chosen = [run for run in ALL_PRETRAININGS if run.name in selected.methods]
    weights = {run.name: runs / "pretrain" / run.name / "models" / "model.pt" for run in chosen}
    starts = plan_starts({run.name: networks[run.name] for run in chosen})
    plan = fine_tuning_runs(selected, starts)
    chains = [finetune_chain(preset, start, k, seed, runs, data, weights) for start, k, seed in plan]
    check_overrides(root, [step for chain in chains for step in chain])
    # A run done in the runs folder is read from there; one only the record holds is not run again.
    in_folder = [all(step.done.is_file() for step in chain) for chain in chains]
    to_run = [(run, chain) for run, chain, done in zip(plan, chains, in_folder)
              if not args.report_only and not done and (run[0].folder, run[1], run[2]) not in record.runs]
    from_folder = [(run, chain) for run, chain, done in zip(plan, chains, in_folder) if done] + to_run
    pretrain_steps = {  # by method
        run.name: Step(f"pretrain {run.name}", run.bundle, preset.pretrain_configs,
                       {**pretrain_overrides[run.name], "dataset_dir": str(data["pretrain"])},
                       runs / "pretrain" / run.name / "train.done.json")
        for run in chosen
        # needed by a run to do, or the weights the folder's done runs started from (their digest is recorded)
        if any(start.pretraining == run.name for (start, _, _), _ in from_folder) or
        (args.report_only and (runs / "pretrain" / run.name / "train.done.json").is_file())
    }
    for (start, _, seed), _ in to_run:
        if start.mode == "random_probe":
            write_random_encoder(start.network, random_encoder_path(runs, start, seed), seed)
    ledger = Ledger(total=len(pretrain_steps) + 2 * len(from_folder))
    run_chains([*(Chain((step,)) for step in pretrain_steps.values()),
                *(Chain(tuple(chain), pretrain_steps.get(start.pretraining)) for (start, _, _), chain in from_folder)],
               root, args.jobs, ledger)
    machine = machine_description()
    digests = {method: record.add_pretraining(method, weights[method], json.loads(step.done.read_text()), machine)
               for method, step in pretrain_steps.items()}

    for (start, k, seed), chain in from_folder:
        result = read_result(runs / "finetune" / start.folder / f"k{k}_seed{seed}", start, k, seed)
        record.add(result, [json.loads(step.done.read_text()) for step in chain], machine,
                   digests.get(start.pretraining))
    record.save()
    results = record.results(plan)
    wall = time.perf_counter() - started
    from_record = len(results) - len(from_folder)
    header = [
        "# Pretraining vs training from scratch with scarce labels (issue #11)"
        + ("" if args.decoder == "default" else ": a linear head on the ViT's tokens"), "",
        f"Written by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; every number below was "
        "measured by a finished bundle run that this invocation made, found done in its runs folder, or found in "
        "the study's record (where the runs of earlier invocations, on this or another machine, are kept).", "",
        f"- Machine of this invocation: {machine}" + (f"; {args.jobs} bundle run(s) at a time." if ledger.ran else "."),
        "- OMP_NUM_THREADS of the reported fine-tuning runs: " + (", ".join(
            f"{setting} ({count} run{'s' * (count != 1)})"
            for setting, count in sorted(record.thread_settings(results).items())
        ) or "none reported") + ".",
        *(f"- Machine of recorded runs: {other}." for other in record.machines(results, selected.methods)
          if other != machine),
        f"- Wall time: {duration(wall)} for this invocation, which ran {len(ledger.ran)} bundle commands "
        f"({duration(sum(ledger.ran))}), reused {len(ledger.reused)} done before in the runs folder "
        f"({duration(sum(ledger.reused))} when they ran) and took {from_record} fine-tuning results from the record.",
        f"- Runs and logs: {runs} (each command and its wall time in the `*.done.json` beside its outputs).",
        f"- Record: {display_path(record.path, root)} (settings, pretraining commands with wall times and weights "
        "digests, and the held-out Dice and wall time of every finished run; the tables below are computed from it).",
    ]
    body = [*setup_markdown(preset, record, results, networks, selected, args.report_only), "",
            *results_markdown(results, starts, selected)]
    write_report(out, header, body)
    print("\n".join(line for line in body if line.startswith("- **")))
    if args.size == "smoke":
        print(f"\n{preset.note}")


if __name__ == "__main__":
    main()
