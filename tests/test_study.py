"""bench/study.py without running any bundle: its plans against the real configs, and its tables from fake CSVs."""

import json
import math
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from bench_script import load_bench_script

ROOT = Path(__file__).resolve().parents[1]
study = load_bench_script("study")


def _write_test_outputs(folder: Path, organs: dict[str, list[float]]) -> float:
    """Fake MetricsSaver reports of one evaluated run; returns the mean it records."""
    test = folder / "test"
    test.mkdir(parents=True)
    scans = len(next(iter(organs.values())))
    rows = ["filename," + ",".join(organs) + ",mean"]
    means = []
    for scan in range(scans):
        values = [organs[name][scan] for name in organs]
        present = [v for v in values if not math.isnan(v)]
        means.append(sum(present) / len(present))
        rows.append(f"/data/phantom_{scan:03d}.nii.gz," + ",".join(f"{v:.4f}" for v in values) + f",{means[-1]:.4f}")
    (test / "val_mean_dice_raw.csv").write_text("\n".join(rows) + "\n")
    overall = sum(means) / len(means)
    (test / "metrics.csv").write_text(f"val_mean_dice,{overall}\nval_hd95_vox,12.5\n")
    return overall


def test_mean_sd_in_dice_points():
    assert study.mean_sd([0.5, 0.6, 0.7]) == "60.0 ± 10.0"
    assert study.mean_sd([0.5]) == "50.0"
    assert study.mean_sd([0.5, math.nan]) == "50.0"
    assert study.mean_sd([]) == "n/a"


def test_tables_and_verdicts_come_from_the_csvs(tmp_path):
    network = {"network_kind": "vit", "encoder_size": "tiny", "roi_size": [64, 64, 64], "encoder_args": {}}
    starts = study.plan_starts({"good": network, "weak": network})
    assert [s.folder for s in starts] == ["scratch_vit-tiny-64", "good", "good_probe", "weak", "weak_probe",
                                          "random_probe_vit-tiny-64"]
    # mean Dice per seed; gains over scratch, paired by seed: good +5, +2, +6 (mean 4.33); weak +1, +2, +3 (mean 2);
    # probes over the frozen random encoder: good_probe +5, +8, +8 (mean 7), weak_probe +15, +18, +18 (mean 17)
    means = {"scratch_vit-tiny-64": [0.40, 0.50, 0.60], "good": [0.45, 0.52, 0.66], "good_probe": [0.30, 0.40, 0.50],
             "weak": [0.41, 0.52, 0.63], "weak_probe": [0.40, 0.50, 0.60],
             "random_probe_vit-tiny-64": [0.25, 0.32, 0.42]}
    results = []
    for start in starts:
        for seed, mean in enumerate(means[start.folder]):
            folder = tmp_path / start.folder / f"k1_seed{seed}"
            # two scans; the spleen is missing (nan) on the second one and must not count
            written = _write_test_outputs(folder, {"liver": [mean + 0.1, mean + 0.1], "spleen": [mean - 0.1, math.nan]})
            results.append(study.read_result(folder, start, 1, seed))
            assert results[-1].mean == pytest.approx(written)
    scratch_seed0 = next(r for r in results if r.start.mode == "scratch" and r.seed == 0)
    assert scratch_seed0.organs == pytest.approx({"liver": 0.5, "spleen": 0.3})

    preset = study.PRESETS["smoke"]
    text = "\n".join(study.results_markdown(results, starts, preset))
    scratch_means = [r.mean for r in results if r.start.mode == "scratch"]
    assert f"| scratch_vit-tiny-64 | scratch | UNETR (vit-tiny), 64³ crops | {study.mean_sd(scratch_means)} |" in text
    assert "| good | finetune | 4.3 ± 2.1 |" in text  # paired: sd of (5, 2, 6), not of the two columns
    assert "| weak | finetune | 2.0 ± 1.0 |" in text
    assert "| good_probe | probe | -10.0 ± 0.0 |" in text
    assert "| random_probe_vit-tiny-64 | random_probe | -17.0 ± 1.7 |" in text  # over scratch: -15, -18, -18
    assert "| good_probe | 7.0 ± 1.7 |" in text and "| weak_probe | 17.0 ± 1.7 |" in text
    assert ("Frozen encoder (probing): 45.0 ± 10.0, -10.0 ± 0.0 points against scratch, 7.0 ± 1.7 against the "
            "encoder frozen at its random initialisation (38.0 ± 8.5).") in text
    assert "**good**" in text
    assert "mean paired gain +4.33 Dice points (3 seeds, sd 2.08): the ≥ 3-point target is met" in text
    assert "mean paired gain +2.00 Dice points (3 seeds, sd 1.00): the ≥ 3-point target is not met" in text


def test_verdict_says_when_k1_was_not_measured():
    network = {"network_kind": "cnn", "encoder_size": "tiny", "roi_size": [32, 32, 32], "encoder_args": {}}
    starts = study.plan_starts({"frepa_cnn": network})
    assert "k = 1 was not measured" in study.verdict([], starts, "frepa_cnn")


def test_labelled_order_shuffles_training_cases_and_keeps_validation_last(tmp_path):
    cases = [{"image": f"./imagesTr/p{i}.nii.gz", "label": f"./labelsTr/p{i}.nii.gz"} for i in range(6)]
    pool = tmp_path / "dataset.json"
    pool.write_text(json.dumps({"name": "phantoms", "labels": {"0": "background"}, "training": cases}))
    orders = {seed: json.loads(study.labelled_order(pool, 2, seed).read_text())["training"] for seed in range(4)}
    for order in orders.values():
        assert order[-2:] == cases[-2:]
        assert sorted(c["image"] for c in order[:-2]) == [c["image"] for c in cases[:-2]]
    assert len({tuple(c["image"] for c in order) for order in orders.values()}) > 1
    assert json.loads(study.labelled_order(pool, 2, 3).read_text())["training"] == orders[3]


def test_every_pool_is_generated_at_the_presets_soft_tissue_contrast(tmp_path):
    isodense = replace(study.PRESETS["smoke"], soft_tissue_contrast=0.0)
    paths = study.phantom_pools(isodense, tmp_path / "isodense", ("finetune", "test"))
    assert [json.loads(path.read_text())["generator"]["soft_tissue_contrast"] for path in paths.values()] == [0.0, 0.0]
    # another contrast is other data: a study's settings, which guard its runs folder and record, differ
    networks = {"hiend_mae": {"network_kind": "vit"}}
    assert study.study_settings("smoke", isodense, networks) != study.study_settings("smoke", study.PRESETS["smoke"],
                                                                                     networks)


def test_preset_refuses_budgets_that_differ_between_k():
    smoke = study.PRESETS["smoke"]
    fields = {name: getattr(smoke, name) for name in study.Preset.__dataclass_fields__}
    with pytest.raises(ValueError, match="not a multiple of k = 2"):
        study.Preset(**{**fields, "label_counts": (1, 2), "steps": 3})
    with pytest.raises(ValueError, match="needs scratch runs at the same k"):
        study.Preset(**{**fields, "probe_label_counts": (2,)})
    with pytest.raises(ValueError, match="do not fit"):
        study.Preset(**{**fields, "label_counts": (5,), "probe_label_counts": (5,), "steps": 5, "warmup_steps": 5,
                        "val_every": 5})


@pytest.mark.parametrize("size", sorted(study.PRESETS))
def test_every_preset_plans_against_the_bundle_configs(size, tmp_path):
    """The keys the study overrides exist in today's configs; the fine-tuning networks match the encoders."""
    preset = study.PRESETS[size]
    _, networks = study.pretraining_plan(ROOT, preset, tmp_path)
    assert set(networks) == {"hiend_mae", "maesil", "frepa_vit", "frepa_swin", "frepa_cnn", "frepa_cnn_no_lfp",
                             "frepa_cnn_seed1"}
    assert [networks[f"frepa_{kind}"]["network_kind"] for kind in ("vit", "swin", "cnn")] == ["vit", "swin", "cnn"]
    assert networks["maesil"]["encoder_args"]["patch_size"] == 8
    assert networks["hiend_mae"]["roi_size"] == networks["frepa_vit"]["roi_size"]

    data = {"test": tmp_path / "test.json", **{f"finetune_seed{s}": tmp_path / f"ft{s}.json" for s in preset.seeds}}
    weights = {name: tmp_path / name / "model.pt" for name in networks}
    starts = study.plan_starts(networks)
    runs = study.fine_tuning_runs(preset, starts)
    chains = [study.finetune_chain(preset, start, k, seed, tmp_path, data, weights) for start, k, seed in runs]
    study.check_overrides(ROOT, [step for chain in chains for step in chain])
    for (start, k, seed), (train, evaluate) in zip(runs, chains, strict=True):
        assert train.overrides["epochs"] * k == preset.steps  # the same budget of steps for every k
        assert ("pretrained#model_path" in train.overrides) == (start.mode != "scratch")
        if start.mode == "random_probe":  # a frozen encoder is a loaded one: the random one is written first
            assert train.overrides["pretrained#model_path"] == str(study.random_encoder_path(tmp_path, start, seed))
        assert train.overrides.get("freeze_encoder", False) == (start.mode in ("probe", "random_probe"))
        assert evaluate.overrides["dataset_dir"] == str(data["test"])
        assert evaluate.overrides["num_val"] == preset.test_pool.num
    assert {k for _, k, _ in runs} == set(preset.label_counts) | set(preset.probe_label_counts)
    assert len({seed for _, _, seed in runs}) == len(preset.seeds)


def test_selection_narrows_the_grid_refuses_label_counts_outside_the_preset_and_adds_seeds():
    parser = study.argparse.ArgumentParser()
    preset = study.PRESETS["small"]
    args = study.argparse.Namespace(size="small", methods=["hiend_mae"], label_counts=[1], probe_label_counts=[],
                                    seeds=None)
    selected = study.run_selection(parser, preset, args)
    assert selected == study.Selection(("hiend_mae",), (1,), (), preset.seeds)
    network = {"network_kind": "vit", "encoder_size": "tiny", "roi_size": [64, 64, 64], "encoder_args": {}}
    runs = study.fine_tuning_runs(selected, study.plan_starts({"hiend_mae": network}))
    assert [(start.mode, k) for start, k, _ in runs] == [("scratch", 1), ("finetune", 1)] * len(preset.seeds)
    one_seed = study.run_selection(parser, preset, study.argparse.Namespace(
        size="small", methods=None, label_counts=None, probe_label_counts=None, seeds=[2]))
    assert one_seed.seeds == (2,) and one_seed.label_counts == preset.label_counts
    more_seeds = study.run_selection(parser, preset, study.argparse.Namespace(
        size="small", methods=None, label_counts=None, probe_label_counts=None, seeds=[7, 0, 3, 3]))
    assert more_seeds.seeds == (0, 3, 7)
    for narrowing in ({"label_counts": [3]}, {"probe_label_counts": [4]}):
        with pytest.raises(SystemExit):
            study.run_selection(parser, preset, study.argparse.Namespace(
                **{"size": "small", "methods": None, "label_counts": None, "probe_label_counts": None, "seeds": None,
                   **narrowing}))


def test_variants_run_when_named_and_keep_the_settings(tmp_path):
    preset = study.PRESETS["small"]
    _, networks = study.pretraining_plan(ROOT, preset, tmp_path)
    parser = study.argparse.ArgumentParser()
    grid = {"size": "small", "label_counts": None, "probe_label_counts": None, "seeds": None}
    default = study.run_selection(parser, preset, study.argparse.Namespace(methods=None, **grid))
    for variant in study.VARIANTS:
        assert networks[variant.name] == networks[variant.variant_of]
        assert variant.name not in default.methods
        named = study.run_selection(parser, preset, study.argparse.Namespace(methods=[variant.name], **grid))
        assert named.methods == (variant.name,)
    assert study.study_settings("small", preset, networks) == study.study_settings(
        "small", preset, {name: network for name, network in networks.items()
                          if name not in {variant.name for variant in study.VARIANTS}})


def pretraining_config(preset, overrides, name: str):
    """The bundle config of the study's pretraining run ``name`` with its ``overrides`` (from pretraining_plan)."""
    bundle = next(run.bundle for run in study.ALL_PRETRAININGS if run.name == name)
    config = study.bundle_config(ROOT, bundle, preset.pretrain_configs, overrides[name])
    config.update(overrides[name])
    return config


def test_the_frepa_cnn_ablation_pretrains_without_the_perturbation(tmp_path):
    preset = study.PRESETS["small"]
    overrides, _ = study.pretraining_plan(ROOT, preset, tmp_path)
    crop = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    perturbed = {}
    for name in ("frepa_cnn", "frepa_cnn_no_lfp"):
        config = pretraining_config(preset, overrides, name)
        corruption = config.get_parsed_content("corruption", instantiate=True)
        perturbed[name] = corruption.views(crop, torch.Generator().manual_seed(1))[1]
    torch.testing.assert_close(perturbed["frepa_cnn_no_lfp"], crop, atol=1e-6, rtol=0)
    assert (perturbed["frepa_cnn"] - crop).abs().max() > 1e-3


def test_the_reseeded_frepa_cnn_starts_from_other_weights(tmp_path):
    preset = study.PRESETS["small"]
    overrides, _ = study.pretraining_plan(ROOT, preset, tmp_path)
    first_weights = {}
    for name in ("frepa_cnn", "frepa_cnn_seed1"):
        config = pretraining_config(preset, overrides, name)
        config.get_parsed_content("initialize")
        first_weights[name] = next(config.get_parsed_content("network_def", instantiate=True).parameters())
    assert first_weights["frepa_cnn"].shape == first_weights["frepa_cnn_seed1"].shape
    assert not torch.equal(first_weights["frepa_cnn"], first_weights["frepa_cnn_seed1"])


def test_settings_leave_out_the_grid_axes_and_accept_records_that_kept_them(tmp_path):
    """Runs are recorded by k and seed, so more seeds or label counts must not refuse a record or runs folder
    written before, while a change to how a run is made still does."""
    preset = study.PRESETS["small"]
    settings = study.study_settings("small", preset, {})
    more = replace(preset, seeds=(0, 1, 2, 3, 4), label_counts=(1, 2))
    assert study.study_settings("small", more, {}) == settings
    assert study.study_settings("small", replace(preset, crops_per_step=preset.crops_per_step + 1), {}) != settings
    old_style = json.loads(json.dumps(settings))
    old_style["preset"].update(seeds=[0, 1, 2], label_counts=[1, 2, 4], probe_label_counts=[1])
    (tmp_path / "results.json").write_text(json.dumps({"settings": old_style, "pretraining": {}, "runs": []}))
    study.StudyRecord.open(tmp_path / "results.json", settings)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "study.json").write_text(json.dumps(old_style))
    study.guard_settings(runs, settings)
    assert "seeds" not in json.loads((runs / "study.json").read_text())["preset"]
    with pytest.raises(SystemExit, match="other study settings"):
        study.guard_settings(runs, study.study_settings("small", replace(preset, crops_per_step=1), {}))


def _settings(size: str = "smoke") -> dict:
    return {"size": size, "preset": {"steps": 2}, "networks": {}}


def _recorded_results(tmp_path: Path, starts, seeds=(0, 1)) -> list:
    results = []
    for start in starts:
        for seed in seeds:
            folder = tmp_path / "runs" / start.folder / f"k1_seed{seed}"
            _write_test_outputs(folder, {"liver": [0.5 + 0.1 * seed, 0.7], "spleen": [math.nan, math.nan]})
            results.append(study.read_result(folder, start, 1, seed))
    return results


def test_record_keeps_every_result_and_refuses_other_settings(tmp_path):
    network = {"network_kind": "cnn", "encoder_size": "tiny", "roi_size": [32, 32, 32], "encoder_args": {}}
    starts = study.plan_starts({"frepa_cnn": network})
    path = tmp_path / "results.json"
    record = study.StudyRecord.open(path, _settings())
    results = _recorded_results(tmp_path, starts)
    done = [{"wall_s": 60.0, "finished": "2026-12-06T01:00:00+00:00"},
            {"wall_s": 6.0, "finished": "2026-12-06T01:01:00+00:00"}]
    for result in results:
        record.add(result, done, "machine A", None)
    record.save()

    reopened = study.StudyRecord.open(path, _settings())
    plan = [(start, 1, seed) for start in starts for seed in (0, 1, 2)]  # seed 2 was never run
    recorded = reopened.results(plan)
    assert [(r.start.folder, r.seed) for r in recorded] == [(r.start.folder, r.seed) for r in results]
    for read, original in zip(recorded, results):
        assert read.mean == pytest.approx(original.mean)
        assert read.organs["liver"] == pytest.approx(original.organs["liver"])
        assert math.isnan(read.organs["spleen"])  # absent from every scan: null in the JSON, NaN again
    assert json.loads(path.read_text())["runs"][0]["wall_s"] == 66.0
    assert reopened.machines(recorded, []) == ["machine A"]
    with pytest.raises(SystemExit, match="other settings"):
        study.StudyRecord.open(path, _settings("small"))


def test_record_keeps_each_pretraining_and_says_which_results_came_from_which(tmp_path):
    """Continued on another machine, a method's pretraining can give other weights: recorded beside the first,
    and the report says how many results came from each."""
    network = {"network_kind": "cnn", "encoder_size": "tiny", "roi_size": [32, 32, 32], "encoder_args": {}}
    starts = study.plan_starts({"frepa_cnn": network})
    record = study.StudyRecord.open(tmp_path / "results.json", _settings())
    weights = tmp_path / "model.pt"
    done = {"command": "(cd bundles/frepa && python -m monai.bundle run --encoder_kind cnn)", "wall_s": 200.0,
            "finished": "2026-12-06T01:00:00+00:00"}
    weights.write_bytes(b"first pretraining")
    first = record.add_pretraining("frepa_cnn", weights, done, "machine A")
    assert record.add_pretraining("frepa_cnn", weights, {**done, "wall_s": 1.0}, "machine A") == first
    weights.write_bytes(b"second pretraining")
    second = record.add_pretraining("frepa_cnn", weights, done, "machine B")
    assert second != first
    assert [run["machine"] for run in record.pretraining["frepa_cnn"]] == ["machine A", "machine B"]
    assert record.pretraining["frepa_cnn"][0]["wall_s"] == 200.0  # the same weights again add nothing

    results = _recorded_results(tmp_path, starts[:2], seeds=(0, 1, 2))
    for result in results:
        origin = None if result.start.mode == "scratch" else (first if result.seed < 2 else second)
        record.add(result, [done], "machine A" if result.seed < 2 else "machine B", origin)
    assert record.pretraining_origins(results, "frepa_cnn") == {first: 2, second: 1}
    assert record.machines(results, ["frepa_cnn"]) == ["machine A", "machine B"]
    selection = study.Selection(("frepa_cnn",), (1,), (), (0, 1, 2))
    text = "\n".join(study.setup_markdown(study.PRESETS["smoke"], record, results, {"frepa_cnn": network}, selection))
    assert text.count("`(cd bundles/frepa && python -m monai.bundle run --encoder_kind cnn)` (3.3 min") == 2
    assert "- Every pool at the phantom generator's soft-tissue contrast 1 (1: unenhanced" in text
    counts = ", ".join(f"{count} from {digest[:12]}" for digest, count in sorted({first: 2, second: 1}.items()))
    assert (f"  - frepa_cnn's results came from 2 pretraining runs of this command on different machines ({counts}); "
            "its sd includes the variation between them.") in text


def test_a_study_whose_runs_are_all_recorded_runs_nothing_and_reports_them(tmp_path, monkeypatch):
    """A fresh clone: an empty runs folder and the committed record; nothing runs, the report comes from the record."""
    preset, runs, out = study.PRESETS["smoke"], tmp_path / "runs", tmp_path / "results.md"
    _, networks = study.pretraining_plan(ROOT, preset, runs)
    record = study.StudyRecord.open(out.with_suffix(".json"), study.study_settings("smoke", preset, networks))
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"hiend_mae pretraining")
    pretraining = {"command": "(cd bundles/hiend_mae && python -m monai.bundle run --epochs 1)", "wall_s": 90.0,
                   "finished": "2026-12-06T01:00:00+00:00"}
    digest = record.add_pretraining("hiend_mae", weights, pretraining, "machine A")
    starts = [s for s in study.plan_starts({"hiend_mae": networks["hiend_mae"]}) if s.mode in ("scratch", "finetune")]
    fine_tuning = [{"wall_s": 60.0, "finished": "2026-12-06T01:00:00+00:00"},  # recorded before thread settings
                   {"wall_s": 60.0, "finished": "2026-12-06T02:00:00+00:00", "omp_num_threads": "1"}]
    for result, liver, done in zip(_recorded_results(tmp_path, starts, seeds=(0,)), (0.40, 0.46), fine_tuning):
        record.add(study.RunResult(result.start, 1, 0, {"liver": liver}, liver), [done], "machine A",
                   None if result.start.mode == "scratch" else digest)
    record.save()

    def no_bundle_runs(*args, **kwargs):
        raise AssertionError(f"ran a bundle although every run is recorded: {args}")

    monkeypatch.setattr(study, "run_bundle", no_bundle_runs)
    study.main(["--size", "smoke", "--runs", str(runs), "--out", str(out), "--methods", "hiend_mae",
                "--probe-label-counts"])
    report = out.read_text()
    assert "ran 0 bundle commands" in report and "took 2 fine-tuning results from the record" in report
    assert "- Machine of recorded runs: machine A." in report
    assert "- OMP_NUM_THREADS of the reported fine-tuning runs: 1 (1 run), not recorded (1 run)." in report
    assert "bundle run(s) at a time" not in report  # this invocation's settings describe none of the runs
    assert "| hiend_mae | finetune | 6.0 |" in report  # the paired gain, 46 - 40 Dice points
    assert f"`{pretraining['command']}` (1.5 min; weights sha256 " in report


def test_a_cell_of_fewer_seeds_than_the_study_says_how_many(tmp_path):
    network = {"network_kind": "cnn", "encoder_size": "tiny", "roi_size": [32, 32, 32], "encoder_args": {}}
    starts = study.plan_starts({"frepa_cnn": network})  # scratch, fine-tuned, probe (not run)
    results = [study.RunResult(start, k, seed, {"liver": mean}, mean)
               for start, base in zip(starts[:2], (0.30, 0.35))
               for k, seeds in ((1, (0, 1, 2)), (2, (0, 1)))
               for seed, mean in zip(seeds, (base, base + 0.1, base + 0.2))]
    selection = study.Selection(("frepa_cnn",), (1, 2), (), (0, 1, 2))
    text = "\n".join(study.results_markdown(results, starts, selection))
    network_cell = "SegResNet (cnn-tiny), 32³ crops"
    assert f"| frepa_cnn | finetune | {network_cell} | 45.0 ± 10.0 | 40.0 ± 7.1 (2 of 3 seeds) |" in text
    assert "| frepa_cnn | finetune | 5.0 ± 0.0 | 5.0 ± 0.0 (2 of 3 seeds) |" in text


def test_linear_decoder_fine_tunes_the_vit_methods_in_folders_of_their_own(tmp_path, capsys):
    preset = study.PRESETS["smoke"]
    _, networks = study.pretraining_plan(ROOT, preset, tmp_path)
    assert study.with_decoder(networks, "default") == networks
    linear = study.with_decoder(networks, "linear")
    assert set(linear) == {"hiend_mae", "maesil", "frepa_vit"}
    assert study.describe_network(linear["maesil"]).startswith("ViT + linear head (vit-tiny, num_heads 3")
    starts = study.plan_starts(linear)
    assert {s.folder for s in starts if s.mode == "scratch"} == {
        f"scratch_{study.network_label(networks[name])}-linear" for name in ("hiend_mae", "maesil")}
    data = {"test": tmp_path / "test.json", "finetune_seed0": tmp_path / "ft0.json"}
    weights = {name: tmp_path / name / "model.pt" for name in linear}
    chains = [study.finetune_chain(preset, start, 1, 0, tmp_path, data, weights) for start in starts]
    study.check_overrides(ROOT, [step for chain in chains for step in chain])  # seg_finetune has "decoder"
    assert all(step.overrides["decoder"] == "linear" for chain in chains for step in chain)

    with pytest.raises(SystemExit):
        study.main(["--size", "smoke", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "r.md"),
                    "--decoder", "linear", "--methods", "frepa_cnn"])
    assert "--decoder linear needs a ViT encoder; ['frepa_cnn'] have none" in capsys.readouterr().err


def test_amp_fine_tunes_and_evaluates_with_seg_finetunes_amp_under_settings_of_its_own(tmp_path):
    preset, runs, out = study.PRESETS["smoke"], tmp_path / "runs", tmp_path / "r.md"
    study.main(["--size", "smoke", "--runs", str(runs), "--out", str(out), "--amp", "--report-only",
                "--methods", "hiend_mae"])
    assert "UNETR (vit-tiny), 32³ crops, amp (bfloat16 autocast on the CPU)" in out.read_text()
    networks = json.loads(out.with_suffix(".json").read_text())["settings"]["networks"]
    assert networks["hiend_mae"]["amp"] is True
    # The same study without --amp is another study: its record refuses these runs.
    with pytest.raises(SystemExit, match="other settings"):
        study.main(["--size", "smoke", "--runs", str(tmp_path / "fp32"), "--out", str(out), "--report-only",
                    "--methods", "hiend_mae"])
    starts = study.plan_starts({"hiend_mae": networks["hiend_mae"]})
    data = {"test": tmp_path / "test.json", "finetune_seed0": tmp_path / "ft0.json"}
    chain = study.finetune_chain(preset, starts[0], 1, 0, runs, data, {"hiend_mae": tmp_path / "model.pt"})
    study.check_overrides(ROOT, chain)
    assert [step.overrides["amp"] for step in chain] == [True, True]  # fine-tuning and its evaluation


@pytest.mark.parametrize("decoder", ["default", "linear"])
def test_random_encoder_loads_back_strictly_and_depends_on_the_seed(tmp_path, decoder):
    """The random-probe baseline's frozen encoder: seg_finetune's loader takes it like a pretraining's weights."""
    from medssl.encoders import build_segmentation_network
    from medssl.zoo import copy_encoder_weights

    network = {"network_kind": "vit", "encoder_size": "tiny", "roi_size": [32, 32, 32],
               "encoder_args": {"num_layers": 2}, "decoder": decoder}
    start = study.Start("random_probe_x", "random_probe", network)
    paths = [study.random_encoder_path(tmp_path, start, seed) for seed in (0, 1)]
    for seed, path in zip((0, 1), paths):
        study.write_random_encoder(network, path, seed)
    saved = [torch.load(path, weights_only=True) for path in paths]
    assert saved[0].keys() == saved[1].keys() and all(key.startswith("encoder.") for key in saved[0])
    assert not torch.equal(saved[0]["encoder.blocks.0.attn.qkv.weight"], saved[1]["encoder.blocks.0.attn.qkv.weight"])
    target = build_segmentation_network("vit", "tiny", img_size=32, encoder_args={"num_layers": 2}, decoder=decoder)
    report = copy_encoder_weights(target, "vit", saved[0])  # strict: every encoder tensor, nothing left over
    assert report.expected == len(report.copied) == len(saved[0])
    assert torch.equal(target.state_dict()["vit.blocks.0.attn.qkv.weight"], saved[0]["encoder.blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("threads", ["1", None])
def test_a_bundle_command_records_the_threads_it_ran_with(tmp_path, monkeypatch, threads):
    """The bundle process inherits OMP_NUM_THREADS; its *.done.json keeps it (null: unset) for the record."""
    if threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
    monkeypatch.setattr(study, "run_bundle", lambda *args, **kwargs: 12.5)
    step = study.Step("fine-tune", "seg_finetune", ("configs/train.json",), {"epochs": 2}, tmp_path / "train.done.json")
    assert study.run_step(step, ROOT) == (12.5, True)
    done = json.loads(step.done.read_text())
    assert done["omp_num_threads"] == threads
    network = {"network_kind": "cnn", "encoder_size": "tiny", "roi_size": [32, 32, 32], "encoder_args": {}}
    record = study.StudyRecord.open(tmp_path / "results.json", _settings())
    result = _recorded_results(tmp_path, study.plan_starts({"frepa_cnn": network})[:1], seeds=(0,))[0]
    record.add(result, [done], "machine A", None)
    assert record.thread_settings([result]) == {threads or "unset": 1}


def test_a_done_step_of_other_settings_is_refused_and_a_moved_one_reused(tmp_path, monkeypatch):
    """A preset change (say, more pretraining epochs) must not silently reuse the runs made before it."""
    monkeypatch.setattr(study, "run_bundle", lambda *args, **kwargs: 12.5)
    done = tmp_path / "train.done.json"

    def step(epochs: int, root: str) -> study.Step:
        return study.Step("pretrain", "maesil", ("configs/train.json",), {"epochs": epochs, "bundle_root": root}, done)

    assert study.run_step(step(30, "/old/runs/maesil"), ROOT) == (12.5, True)
    assert json.loads(done.read_text())["settings"] == {"epochs": 30}
    assert study.run_step(step(30, "/new/runs/maesil"), ROOT) == (12.5, False)  # the runs folder moved: reused
    with pytest.raises(SystemExit, match=r"other settings \(epochs: 30 -> 300\): delete"):
        study.run_step(step(300, "/old/runs/maesil"), ROOT)


def _chain_steps(tmp_path: Path, names: Sequence[str]) -> dict[str, study.Step]:
    return {name: study.Step(name, "seg_finetune", ("configs/train.json",), {"name": name},
                             tmp_path / f"{name}.done.json") for name in names}


def test_runs_that_need_no_pretraining_fill_the_cores_while_it_runs(tmp_path, monkeypatch):
    """Two jobs, one pretraining: scratch runs alongside it, the pretrained run only after it."""
    steps = _chain_steps(tmp_path, ["pretrain", "finetune", "scratch"])
    scratch_ran, started = threading.Event(), []

    def run_bundle(bundle, configs, *args, log):
        name = Path(log).stem
        started.append(name)
        if name == "pretrain":  # finishes only once the scratch run has run beside it
            assert scratch_ran.wait(timeout=10), "the scratch run waited for the pretraining"
        if name == "finetune":
            assert steps["pretrain"].done.is_file(), "fine-tuned before its pretraining finished"
        if name == "scratch":
            scratch_ran.set()
        return 1.0

    monkeypatch.setattr(study, "run_bundle", run_bundle)
    ledger = study.Ledger(total=3)
    study.run_chains([study.Chain((steps["pretrain"],)), study.Chain((steps["finetune"],), steps["pretrain"]),
                      study.Chain((steps["scratch"],))], ROOT, 2, ledger)
    assert sorted(started[:2]) == ["pretrain", "scratch"] and started[2] == "finetune"
    assert len(ledger.ran) == 3


def test_a_failed_pretraining_stops_the_study_before_its_runs(tmp_path, monkeypatch):
    steps = _chain_steps(tmp_path, ["pretrain", "finetune"])
    started = []

    def run_bundle(bundle, configs, *args, log):
        started.append(Path(log).stem)
        raise RuntimeError(f"{bundle} failed")

    monkeypatch.setattr(study, "run_bundle", run_bundle)
    with pytest.raises(RuntimeError, match="seg_finetune failed"):
        study.run_chains([study.Chain((steps["pretrain"],)), study.Chain((steps["finetune"],), steps["pretrain"])],
                         ROOT, 2, study.Ledger(total=2))
    assert started == ["pretrain"]
