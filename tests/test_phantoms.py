"""Synthetic CT phantoms: deterministic bytes, anatomy that varies by seed, plausible HU, correct NIfTI geometry."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medssl.data.phantoms import (
    HU,
    LABEL_IDS,
    LABELS,
    SOFT_TISSUES,
    generate_phantom,
    main,
    tissue_numbers,
    write_phantom_dataset,
)

# (low, high) of the median HU inside each organ, away from its boundary (mask eroded by one voxel)
ORGAN_HU = {
    "liver": (45, 75),
    "spleen": (35, 65),
    "kidney_right": (15, 45),
    "kidney_left": (15, 45),
    "lung": (-900, -780),
    "bone": (300, 1000),
    "aorta": (25, 60),
}


@pytest.fixture(scope="module")
def settings(phantom_dataset) -> dict:
    """How the shared phantom_dataset was generated (recorded in its dataset.json)."""
    content = json.loads(phantom_dataset.read_text())
    return {**content["generator"], "num": content["numTraining"], "num_test": content["numTest"]}


@pytest.fixture(scope="module")
def phantom96():
    return generate_phantom((96, 96, 96), (1.5, 1.5, 1.5), seed=3)


def test_labels_name_background_and_at_least_five_organs():
    assert LABELS[0] == "background"
    assert len(LABELS) >= 6
    assert sorted(LABELS) == list(range(len(LABELS)))


def test_every_organ_is_present_with_plausible_hu(phantom96):
    image, label, _ = phantom96
    assert image.dtype == np.int16 and label.dtype == np.uint8 and image.shape == label.shape == (96, 96, 96)
    assert set(np.unique(label)) == set(LABELS)
    for index, name in LABELS.items():
        if index == 0:
            continue
        core = ndimage.binary_erosion(label == index)
        assert core.sum() > 50, f"{name} is too small to measure"
        low, high = ORGAN_HU[name]
        assert low <= np.median(image[core]) <= high, f"{name}: median {np.median(image[core])} HU"


def test_air_outside_body_fat_and_lung_vessels(phantom96):
    image, label, _ = phantom96
    border = np.concatenate([image[0].ravel(), image[-1].ravel(), image[:, 0].ravel(), image[:, -1].ravel()])
    assert abs(border.mean() + 1000) < 15 and border.max() < -900  # air around the body
    body = ndimage.binary_fill_holes(image > -500, structure=np.ones((3, 3, 1)))  # axial slice by slice
    assert 0.2 < body.mean() < 0.8
    fat = (image > -130) & (image < -70) & body
    assert fat.sum() / body.sum() > 0.05  # subcutaneous and visceral fat
    lung = label == LABEL_IDS["lung"]
    vessels = lung & (image > -600)
    assert 0.005 < vessels.sum() / lung.sum() < 0.3  # a vessel tree inside the lungs, not solid tissue


def test_noise_and_texture_inside_organs(phantom96):
    image, label, _ = phantom96
    liver = ndimage.binary_erosion(label == LABEL_IDS["liver"], iterations=2)
    assert 5 < image[liver].std() < 40  # noisy and textured, not flat


def test_same_seed_same_bytes(phantom_dataset, settings, tmp_path):
    again = write_phantom_dataset(
        tmp_path, num=2, seed=settings["seed"], shape=settings["shape"], spacing=settings["spacing"]
    )
    for sub in ("imagesTr", "labelsTr"):
        for name in ("phantom_000.nii.gz", "phantom_001.nii.gz"):
            first = (phantom_dataset.parent / sub / name).read_bytes()
            assert first == (again.parent / sub / name).read_bytes(), f"{sub}/{name} differs between two runs"


def test_different_seeds_give_different_anatomy():
    _, label_a, _ = generate_phantom((48, 48, 48), seed=0)
    _, label_b, _ = generate_phantom((48, 48, 48), seed=1)
    for name in ("liver", "spleen", "lung"):
        a, b = label_a == LABEL_IDS[name], label_b == LABEL_IDS[name]
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice < 0.9, f"{name} barely changes between seeds (Dice {dice:.2f})"
    image_a, label_a2, _ = generate_phantom((48, 48, 48), seed=0)
    assert np.array_equal(label_a, label_a2)


def test_cases_of_a_dataset_differ(phantom_datalist):
    labels = [np.asarray(nib.load(item["label"]).dataobj) for item in phantom_datalist[:2]]
    assert not np.array_equal(labels[0], labels[1])


def test_nifti_geometry(phantom_datalist, settings):
    shape, spacing = tuple(settings["shape"]), np.array(settings["spacing"])
    image = nib.load(phantom_datalist[0]["image"])
    label = nib.load(phantom_datalist[0]["label"])
    assert image.shape == label.shape == shape
    assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.diag(image.affine)[:3], spacing)
    np.testing.assert_allclose(image.affine[:3, 3], -(np.array(shape) - 1) / 2 * spacing)  # centred on the origin
    np.testing.assert_allclose(image.header.get_zooms(), spacing)
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
    np.testing.assert_allclose(label.affine, image.affine)


def test_anisotropic_grid():
    image, label, affine = generate_phantom((40, 36, 20), spacing=(0.8, 0.8, 2.5), seed=2)
    assert image.shape == label.shape == (40, 36, 20)
    np.testing.assert_allclose(np.diag(affine), [0.8, 0.8, 2.5, 1.0])
    assert len(np.unique(label)) >= 6


def test_dataset_json_is_decathlon_style(phantom_dataset, settings):
    content = json.loads(phantom_dataset.read_text())
    assert content["tensorImageSize"] == "3D" and content["modality"] == {"0": "CT"}
    assert content["labels"] == {str(k): v for k, v in LABELS.items()}
    assert content["numTraining"] == len(content["training"]) == settings["num"] >= 2
    assert content["numTest"] == len(content["test"]) == settings["num_test"]
    for item in content["training"]:
        assert (phantom_dataset.parent / item["image"]).is_file() and (phantom_dataset.parent / item["label"]).is_file()
    assert all((phantom_dataset.parent / path).is_file() for path in content["test"])


def test_cli_writes_a_dataset(tmp_path, capsys):
    json_path = main(["--out", str(tmp_path / "cli"), "--num", "1", "--seed", "7", "--size", "24", "--spacing", "2"])
    assert json_path == tmp_path / "cli" / "dataset.json"
    assert str(json_path) in capsys.readouterr().out
    image = nib.load(tmp_path / "cli" / "imagesTr" / "phantom_000.nii.gz")
    assert image.shape == (24, 24, 24) and image.header.get_zooms() == (2.0, 2.0, 2.0)


def test_soft_tissue_contrast_changes_intensities_not_anatomy(phantom96):
    image, label, _ = phantom96
    flat_image, flat_label, _ = generate_phantom((96, 96, 96), (1.5, 1.5, 1.5), seed=3, soft_tissue_contrast=0.0)
    np.testing.assert_array_equal(flat_label, label)
    interior = {name: ndimage.binary_erosion(label == LABEL_IDS[name]) for name in ("liver", "spleen", "bone")}
    # Unenhanced CT: liver about 10 HU above spleen. Without contrast they share muscle's number;
    # bone is not a soft tissue and keeps its own (up to the blur of its soft-tissue neighbours).
    assert np.median(image[interior["liver"]]) - np.median(image[interior["spleen"]]) > 5
    assert abs(np.median(flat_image[interior["liver"]]) - np.median(flat_image[interior["spleen"]])) < 3
    assert abs(np.median(flat_image[interior["bone"]]) - np.median(image[interior["bone"]])) <= 2


def test_tissue_numbers_scale_soft_tissues_towards_muscle():
    assert tissue_numbers() == HU
    half = tissue_numbers(0.5)
    assert half["liver"] == HU["muscle"] + 0.5 * (HU["liver"] - HU["muscle"]) and half["lung"] == HU["lung"]
    assert set(tissue_numbers(0.0)[name] for name in SOFT_TISSUES) == {HU["muscle"]}
    with pytest.raises(ValueError, match="soft_tissue_contrast"):
        tissue_numbers(-0.5)


def test_cli_records_the_soft_tissue_contrast(tmp_path):
    json_path = main(["--out", str(tmp_path / "flat"), "--num", "1", "--size", "24", "--soft-tissue-contrast", "0"])
    assert json.loads(json_path.read_text())["generator"]["soft_tissue_contrast"] == 0.0


@pytest.mark.parametrize(
    "shape, spacing", [((4, 32, 32), (1.5, 1.5, 1.5)), ((32, 32), (1.5, 1.5)), ((32, 32, 32), (1.5, 0, 1.5))]
)
def test_rejects_unusable_grids(shape, spacing):
    with pytest.raises(ValueError, match="phantom"):
        generate_phantom(shape, spacing)
