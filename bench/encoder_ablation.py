"""What in a pretrained encoder changes its fine-tuning: the size of its weights, what they point at, and where.

Pretraining grows some weights (Frepa-CNN's deepest convolutions end at 1.5-1.7 times their initial
norm), and under AdamW a weight's relative step shrinks as it grows. This fine-tunes seg_finetune,
the way a study does (its preset, phantoms, labelled scans and seeds), from encoders built of a
study's pretrained one and the random initialisation of each seed (the one its scratch run starts
from):

- ``random_at_pretrained_norms``: the random initialisation, each weight tensor (two or more
  dimensions) scaled to the norm of the pretrained tensor of the same name; norms and biases as
  initialised. Pretraining's scale without its content.
- ``pretrained_at_initial_norms``: the pretrained encoder, each weight tensor scaled to the norm of
  the initialised one; norms and biases as pretrained. Pretraining's content at the initial scale.
- ``pretrained_shallow`` / ``pretrained_deep``: the pretrained tensors of the stem and the first
  half of the stages (encoder levels 0 to L // 2 of the deepest level L; for SegResNet the stem and
  the first two stages, at full and half resolution), the rest as initialised; or the other way
  round. Where in the encoder pretraining's effect lies.
- ``random_reseeded``: the initialisation drawn under seed + 1000, at its own norms: how much the
  draw of the initial weights alone changes what the seed's labelled scan teaches.
- ``pretrained_at_initial_activations`` (SegResNet only): the pretrained encoder with the convolution
  that feeds each stage (the stem, each stage's downsampling convolution) scaled so that the stage's
  first residual block gets inputs of the random initialisation's RMS on the seed's labelled scan.
  A SegResNet residual branch normalises its input (group norm first), so this sets how much each
  block adds to what passes by it without touching what any filter detects.

For a SegResNet it prints, per seed, the RMS of each stage's input on the labelled scan from the
initial and the pretrained encoder. It then tabulates the variants' held-out Dice beside the study's scratch
and pretrained runs of the same seeds (mean over organs, and ``--organ``'s). The runs go to
``<runs>/encoder_ablation/``.

    python bench/encoder_ablation.py --size small-long-pretrain64 --amp --pretraining frepa_cnn \\
        --organ aorta --seeds 2 5 6 --jobs 2 --out runs/encoder_ablation_frepa_cnn.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from medssl.data import LABEL_IDS, ct_seg_val_transforms
from medssl.demo import repository_root
from medssl.encoders import SEGMENTATION_PREFIX, build_segmentation_network
from medssl.segmentation import encoder_level
from medssl.zoo import ENCODER_KEY_PREFIX, copy_encoder_weights

import study

MIXED_VARIANTS = ("random_at_pretrained_norms", "pretrained_at_initial_norms", "pretrained_shallow", "pretrained_deep")
VARIANTS = (*MIXED_VARIANTS, "random_reseeded", "pretrained_at_initial_activations")
RESEED = 1000  # random_reseeded's initialisation seed, added to the run's


def rescaled(directions: Mapping[str, torch.Tensor], norms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``directions``' tensors, those of two or more dimensions scaled to the Frobenius norm of ``norms``'
    tensor of the same name; the others (norm layers' scales, biases) as they are."""
    out = {}
    for name, tensor in directions.items():
        if tensor.ndim < 2:
            out[name] = tensor.clone()
            continue
        target = norms[name].float().norm()
        out[name] = (tensor.float() * (target / tensor.float().norm())).to(tensor.dtype)
    return out


def levels(names: Sequence[str], kind: str) -> dict[str, int]:
    """Encoder level of each tensor of a ``kind`` encoder state (pretraining naming, under ``encoder.``): 0 the
    stem, then one per stage or block, as layer-wise learning-rate decay counts them in the segmentation network."""
    in_network = [SEGMENTATION_PREFIX[kind] + name.removeprefix(ENCODER_KEY_PREFIX) for name in names]
    found = {name: encoder_level(key, kind, num_levels=0) for name, key in zip(names, in_network)}  # -1: no stage
    top = max(found.values()) + 1  # what follows the last stage (a ViT's final norm) sits above it
    return {name: top if level < 0 else level for name, level in found.items()}


def variant_encoder(variant: str, pretrained: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor],
                    kind: str = "cnn") -> dict[str, torch.Tensor]:
    """The encoder state of ``variant`` (one of :data:`MIXED_VARIANTS`, made of the pretrained and the initial
    encoder) of a ``kind`` encoder, keyed as ``initial``."""
    pretrained = {name: pretrained[name] for name in initial}
    if variant == "random_at_pretrained_norms":
        return rescaled(initial, pretrained)
    if variant == "pretrained_at_initial_norms":
        return rescaled(pretrained, initial)
    if variant in ("pretrained_shallow", "pretrained_deep"):
        level = levels(list(initial), kind)
        split = max(level.values()) // 2 + 1
        shallow = variant == "pretrained_shallow"
        return {name: (pretrained if (level[name] < split) == shallow else initial)[name].clone() for name in initial}
    raise ValueError(f"unknown variant {variant!r}; choose from {MIXED_VARIANTS}")


def stage_inputs_rms(state: Mapping[str, torch.Tensor], network: Mapping[str, Any], image: torch.Tensor) -> list[float]:
    """RMS of what each stage's first residual block of a SegResNet (seg_finetune ``network`` settings, encoder
    ``state``) gets from ``image`` (1, C, *spatial), stage by stage."""
    built = build_segmentation_network("cnn", network["encoder_size"], img_size=network["roi_size"],
                                       encoder_args=network["encoder_args"])
    copy_encoder_weights(built, "cnn", dict(state))
    found: list[float] = []
    # A stage is (stride-2 convolution, or nothing for the first, then residual blocks).
    hooks = [stage[1].register_forward_pre_hook(lambda module, args: found.append(float(args[0].pow(2).mean().sqrt())))
             for stage in built.down_layers]
    with torch.no_grad():
        built.eval().encode(image)
    for hook in hooks:
        hook.remove()
    return found


def at_initial_activations(pretrained: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor],
                           network: Mapping[str, Any], image: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``pretrained_at_initial_activations`` encoder of a SegResNet: stage by stage, the convolution feeding
    the stage (bias-free, so its output scales with it) scaled so that the stage's first residual block gets
    inputs of ``initial``'s RMS on ``image``."""
    state = {name: pretrained[name].clone() for name in initial}  # pretraining's other tensors left out
    target = stage_inputs_rms(initial, network, image)
    for stage in range(len(target)):
        feeding = f"{ENCODER_KEY_PREFIX}convInit.conv.weight" if stage == 0 else \
            f"{ENCODER_KEY_PREFIX}down_layers.{stage}.0.conv.weight"
        state[feeding] = state[feeding] * (target[stage] / stage_inputs_rms(state, network, image)[stage])
    return state


def labelled_image(dataset_json: Path, spacing: Sequence[float], intensity_range: Sequence[float]) -> torch.Tensor:
    """The first training case of a seeded dataset.json (the k = 1 run's labelled scan) as seg_finetune's
    validation preprocessing gives it at the bundle's ``spacing`` and ``intensity_range``, (1, 1, *spatial),
    each side padded up to a multiple of 16."""
    case = json.loads(dataset_json.read_text())["training"][0]
    preprocessing = ct_seg_val_transforms(spacing=spacing, a_min=intensity_range[0], a_max=intensity_range[1])
    image = preprocessing({"image": str(dataset_json.parent / case["image"]),
                           "label": str(dataset_json.parent / case["label"])})["image"]
    padding = [(-size) % 16 for size in image.shape[1:]]
    return torch.nn.functional.pad(image.as_tensor()[None].float(),
                                   [side for size in reversed(padding) for side in (0, size)])


def norm_ratios(pretrained: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor]) -> list[tuple[str, float]]:
    """(name, pretrained norm / initial norm) of every weight tensor of two or more dimensions."""
    return [(name, float(pretrained[name].float().norm() / tensor.float().norm()))
            for name, tensor in initial.items() if tensor.ndim >= 2]


def ablation_table(results: Mapping[str, Sequence[study.RunResult | None]], seeds: Sequence[int],
                   organ: str) -> list[str]:
    """Markdown rows: per seed, each start's held-out mean Dice with ``organ``'s in brackets, then their mean
    ± sd over the seeds each start has; ``results`` maps a start's name to its result per seed (None: not run)."""
    def cell(values: Sequence[study.RunResult | None]) -> str:
        done = [r for r in values if r is not None]
        if not done:
            return "n/a"
        return f"{study.mean_sd([r.mean for r in done])} ({study.mean_sd([r.organs[organ] for r in done])})"

    lines = ["| seed | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for index, seed in enumerate(seeds):
        lines.append(f"| {seed} | " + " | ".join(cell([column[index]]) for column in results.values()) + " |")
    if len(seeds) > 1:
        lines.append("| mean ± sd | " + " | ".join(cell(column) for column in results.values()) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(study.PRESETS), required=True, help="the study's size")
    parser.add_argument("--amp", action="store_true", help="the study's --amp (its runs folder and fine-tuning)")
    parser.add_argument("--runs", help="the study's runs folder (default runs/study/<size>[-amp])")
    parser.add_argument("--pretraining", required=True, choices=[run.name for run in study.ALL_PRETRAININGS],
                        help="the pretraining whose encoder the variants are made of (its study run must be done)")
    parser.add_argument("--organ", required=True, choices=list(LABEL_IDS)[1:], help="the organ to tabulate")
    parser.add_argument("--seeds", nargs="+", type=int, required=True, help="seeds, as the study's")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="the encoders to fine-tune from (default all)")
    parser.add_argument("--jobs", type=int, default=1, help="bundle runs at a time (default 1)")
    parser.add_argument("--out", required=True, help="Markdown file of the table")
    args = parser.parse_args(argv)
    if args.jobs > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))

    root = repository_root()
    preset = study.PRESETS[args.size]
    runs = Path(args.runs).resolve() if args.runs else root / "runs" / "study" / (args.size + "-amp" * args.amp)
    weights = runs / "pretrain" / args.pretraining / "models" / "model.pt"
    if not weights.is_file():
        parser.error(f"{weights} is missing: run the study with --methods {args.pretraining} first")
    _, networks = study.pretraining_plan(root, preset, runs)
    network = {**networks[args.pretraining], **({"amp": True} if args.amp else {})}
    if "pretrained_at_initial_activations" in args.variants and network["network_kind"] != "cnn":
        parser.error(f"pretrained_at_initial_activations is for SegResNet encoders; {args.pretraining}'s is "
                     f"{network['network_kind']}")
    pretrained = torch.load(weights, map_location="cpu", weights_only=True)

    data = study.phantom_pools(preset, runs / "data", ("finetune", "test"))
    finetune_config = study.bundle_config(root, "seg_finetune", preset.finetune_configs, ["spacing", "intensity_range"])
    out_runs = runs / "encoder_ablation"
    starts = {variant: study.Start(f"{args.pretraining}_{variant}", "finetune", network, variant)
              for variant in args.variants}
    chains = []
    for seed in args.seeds:
        data[f"finetune_seed{seed}"] = study.labelled_order(data["finetune"], preset.finetune_num_val, seed)
        initial = study.random_encoder_state(network, seed)
        if seed == args.seeds[0]:
            print("pretrained / initial norm of each weight tensor:\n" + "\n".join(
                f"  {name}: {ratio:.2f}" for name, ratio in norm_ratios(pretrained, initial)), flush=True)
        image = labelled_image(data[f"finetune_seed{seed}"], finetune_config["spacing"],
                               finetune_config["intensity_range"]) if network["network_kind"] == "cnn" else None
        if image is not None:
            sizes = {name: " ".join(f"{rms:.3f}" for rms in stage_inputs_rms(state, network, image))
                     for name, state in (("initial", initial), ("pretrained", pretrained))}
            print(f"RMS of each stage's input on seed {seed}'s labelled scan: initial {sizes['initial']}, "
                  f"pretrained {sizes['pretrained']}", flush=True)
        for variant, start in starts.items():
            path = out_runs / "encoders" / variant / f"seed{seed}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            if variant == "random_reseeded":
                state = study.random_encoder_state(network, seed + RESEED)
            elif variant == "pretrained_at_initial_activations":
                state = at_initial_activations(pretrained, initial, network, image)
            else:
                state = variant_encoder(variant, pretrained, initial, network["network_kind"])
            torch.save(state, path)
            chains.append(study.Chain(tuple(study.finetune_chain(preset, start, 1, seed, out_runs, data,
                                                                 {variant: path}))))
    study.check_overrides(root, [step for chain in chains for step in chain.steps])
    study.run_chains(chains, root, args.jobs, study.Ledger(total=2 * len(chains)))

    columns = {"scratch": (runs, study.scratch_start(network)),
               args.pretraining: (runs, study.Start(args.pretraining, "finetune", network, args.pretraining)),
               **{variant: (out_runs, start) for variant, start in starts.items()}}
    results = {}
    for name, (folder, start) in columns.items():
        runs_of = [folder / "finetune" / start.folder / f"k1_seed{seed}" for seed in args.seeds]
        results[name] = [study.read_result(run, start, 1, seed) if (run / "test.done.json").is_file() else None
                         for run, seed in zip(runs_of, args.seeds)]
    command = shlex.join(["python", str(Path(__file__).resolve().relative_to(root)),
                          *(sys.argv[1:] if argv is None else argv)])
    header = [f"# Which part of {args.pretraining}'s pretrained encoder changes its fine-tuning", "",
              f"Written by `{command}` on {study.machine_description()}. Held-out Dice, mean over organs "
              f"({args.organ} in brackets), k = 1, the runs of study {args.size}" + " --amp" * args.amp +
              f" ({runs}) beside those from the variants of its encoder (bench/encoder_ablation.py's docstring)."]
    lines = ablation_table(results, args.seeds, args.organ)
    study.write_report(Path(args.out), header, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
