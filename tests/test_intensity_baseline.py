import json
import math
from dataclasses import replace

import nibabel as nib
import numpy as np

from bench_script import load_bench_script

study = load_bench_script("study")  # imported by the script as a sibling module
baseline = load_bench_script("intensity_baseline")
EDGES = np.arange(-175.0, 255.0, 5.0)


def two_organ_volume() -> tuple[np.ndarray, np.ndarray]:
    """Background at -100 HU, organ 1 (a slab) at 60 HU, organ 2 (a smaller slab) at 200 HU."""
    image = np.full((8, 8, 8), -100.0, dtype=np.float32)
    label = np.zeros((8, 8, 8), dtype=np.int64)
    image[:3], label[:3] = 60.0, 1
    image[6:], label[6:] = 200.0, 2
    return image, label


def test_lookup_separates_organs_of_distinct_intensity():
    image, label = two_organ_volume()
    lookup = baseline.fit_lookup(image, label, EDGES, 3)
    prediction = lookup[baseline.bin_index(image, EDGES)]
    np.testing.assert_array_equal(prediction, label)


def test_lookup_gives_a_shared_intensity_to_the_more_frequent_organ():
    image, label = two_organ_volume()
    image[6:] = 60.0  # organ 2 now looks like organ 1 and has fewer voxels
    lookup = baseline.fit_lookup(image, label, EDGES, 3)
    dice = baseline.organ_dice(lookup[baseline.bin_index(image, EDGES)], label, {1: "one", 2: "two"})
    assert dice["two"] == 0.0
    assert math.isclose(dice["one"], 2 * 192 / (192 + 320))


def test_organ_dice_leaves_out_an_organ_absent_from_both_maps():
    label = np.zeros((4, 4, 4), dtype=np.int64)
    label[0] = 1
    dice = baseline.organ_dice(label, label, {1: "one", 2: "two"})
    assert dice["one"] == 1.0 and math.isnan(dice["two"])


def test_evaluate_reads_a_study_data_folder(tmp_path):
    image, label = two_organ_volume()
    for split in ("finetune", "test"):
        (tmp_path / split).mkdir()
        nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / split / "image.nii.gz")
        nib.save(nib.Nifti1Image(label.astype(np.uint8), np.eye(4)), tmp_path / split / "label.nii.gz")
    cases = [{"image": "./image.nii.gz", "label": "./label.nii.gz"}]
    labels = {"0": "background", "1": "one", "2": "two"}
    (tmp_path / "test/dataset.json").write_text(json.dumps({"labels": labels, "training": cases}))
    (tmp_path / "finetune/dataset_seed0.json").write_text(json.dumps({"labels": labels, "training": cases}))
    (result,) = baseline.evaluate(tmp_path, seeds=[0], boxes=[1], intensity_range=[-175, 250])
    assert result["organs"] == {"one": 100.0, "two": 100.0} and result["labelled_scan"] == "image.nii.gz"


def test_feature_averages_over_its_box():
    image = np.zeros((5, 5, 5), dtype=np.float32)
    image[2, 2, 2] = 27.0
    averaged = baseline.feature(image, 3)
    assert averaged[1, 1, 1] == 1.0 and averaged[0, 0, 0] == 0.0
    assert baseline.feature(image, 1) is image


def test_study_pools_at_another_contrast_keep_the_study_anatomy(tmp_path):
    preset = study.PRESETS["smoke"]
    baseline.write_study_pools(tmp_path, replace(preset, soft_tissue_contrast=0.0), seeds=[0, 1])
    for seed in (0, 1):
        order = json.loads((tmp_path / f"finetune/dataset_seed{seed}.json").read_text())["training"]
        assert len(order) == preset.finetune_pool.num
    test_list = json.loads((tmp_path / "test/dataset.json").read_text())
    assert test_list["generator"]["seed"] == study.TEST_PHANTOM_SEED
    assert test_list["generator"]["soft_tissue_contrast"] == 0.0 and len(test_list["training"]) == preset.test_pool.num
    # The same seeds at full contrast: the same labels, other CT numbers in the soft tissues.
    full = tmp_path / "full"
    baseline.write_study_pools(full, preset, seeds=[0])
    case = test_list["training"][0]
    flat_label = np.asarray(nib.load(tmp_path / "test" / case["label"]).dataobj)
    np.testing.assert_array_equal(np.asarray(nib.load(full / "test" / case["label"]).dataobj), flat_label)
    flat_image = np.asarray(nib.load(tmp_path / "test" / case["image"]).dataobj)
    full_image = np.asarray(nib.load(full / "test" / case["image"]).dataobj)
    assert not np.array_equal(flat_image, full_image)
