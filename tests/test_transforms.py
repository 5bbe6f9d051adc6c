"""CT transform presets (shapes, ranges, crop sampling) and the bad-input errors of the training loading path."""

import gzip
import logging
import re
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medssl.data import (
    BadScanError,
    build_dataset,
    ct_infer_transforms,
    ct_pretrain_transforms,
    ct_seg_train_transforms,
    ct_seg_val_transforms,
    read_scan_header,
    validate_datalist,
)
from medssl.data.transforms import LoadScand

ROI = (32, 32, 32)


def first_image(phantom_datalist) -> tuple[np.ndarray, np.ndarray]:
    scan = nib.load(phantom_datalist[0]["image"])
    return np.asarray(scan.dataobj), scan.affine


@pytest.fixture(scope="module")
def bad_scans(phantom_datalist, tmp_path_factory) -> dict[str, Path]:
    """One broken file per kind of bad input, made from the first phantom."""
    folder = tmp_path_factory.mktemp("bad_scans")
    volume, affine = first_image(phantom_datalist)
    raw = Path(phantom_datalist[0]["image"]).read_bytes()
    scans = {
        "truncated": folder / "truncated.nii.gz",
        "text": folder / "text.nii.gz",
        "two_channels": folder / "two_channels.nii.gz",
        "slice_2d": folder / "slice_2d.nii.gz",
        "nan": folder / "nan.nii.gz",
        "inf": folder / "inf.nii.gz",
        "single_slice": folder / "single_slice.nii.gz",
        "truncated_nii": folder / "truncated.nii",
    }
    scans["truncated"].write_bytes(raw[: len(raw) // 2])
    scans["text"].write_text("this is not an image")
    nib.save(nib.Nifti1Image(np.stack([volume, volume], axis=-1), affine), scans["two_channels"])
    nib.save(nib.Nifti1Image(volume[:, :, 20], affine), scans["slice_2d"])
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        values = volume.astype(np.float32)
        values[10, 10, 10] = value
        nib.save(nib.Nifti1Image(values, affine), scans[name])
    nib.save(nib.Nifti1Image(volume[:, :, :1], affine), scans["single_slice"])
    scans["truncated_nii"].write_bytes(gzip.decompress(raw)[:5000])
    return scans


# what each bad input's message must say besides its path
EXPECTED = {
    "truncated": "cannot read scan .*EOFError",
    "text": "cannot read scan .*not a gzip file",
    "two_channels": "has 2 channels; expected 1 \\(a single-channel 3D CT volume\\)",
    "slice_2d": "has 2 spatial dimensions .*expected a single-channel 3D CT volume",
    "nan": "has 1 NaN/Inf voxels",
    "inf": "has 1 NaN/Inf voxels",
    "single_slice": "fewer than 4 voxels along an axis",
    "truncated_nii": "cannot read scan .*Expected \\d+ bytes",
}


def test_pretrain_preset_shapes_and_range(phantom_datalist):
    transform = ct_pretrain_transforms(roi_size=ROI, num_samples=3, augment=False)
    samples = transform(phantom_datalist[0])
    assert len(samples) == 3
    for sample in samples:
        image = sample["image"]
        assert type(image) is torch.Tensor and image.dtype == torch.float32 and image.shape == (1, *ROI)
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert 0.0 < image.mean() < 1.0


def test_pretrain_augmentations_are_seeded_and_bounded(phantom_datalist):
    def draw(seed):
        transform = ct_pretrain_transforms(roi_size=ROI, num_samples=4, augment=True, scale_prob=1.0, shift_prob=1.0)
        transform.set_random_state(seed=seed)
        return torch.stack([s["image"] for s in transform(phantom_datalist[1])])

    first, again, other = draw(0), draw(0), draw(1)
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other)
    assert first.shape == (4, 1, *ROI)
    assert first.min() >= -0.1 and first.max() <= 1.1 * 1.0 + 0.1 + 1e-6  # scale by <= 1.1, shift by <= 0.1
    assert not torch.all((first >= 0) & (first <= 1))  # the intensity augmentations did act


@pytest.mark.parametrize("pos, neg, body_centre", [(1.0, 0.0, True), (0.0, 1.0, False)])
def test_pretrain_crops_centre_on_body_or_on_air(phantom_datalist, pos, neg, body_centre):
    # one-voxel crops are their own centre (larger ones shift away from the volume's edges)
    transform = ct_pretrain_transforms(roi_size=(1, 1, 1), num_samples=20, pos=pos, neg=neg, augment=False)
    transform.set_random_state(seed=0)
    centres = torch.stack([s["image"].flatten() for s in transform(phantom_datalist[2])])
    assert bool(torch.all(centres > 0)) is body_centre
    assert bool(torch.all(centres == 0)) is not body_centre


def test_scan_smaller_than_the_crop_is_padded(phantom_datalist, tmp_path):
    volume, affine = first_image(phantom_datalist)
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(volume[10:30, 12:36, 20:36], affine), small)
    samples = ct_pretrain_transforms(roi_size=ROI, num_samples=2, augment=False)({"image": str(small)})
    assert all(s["image"].shape == (1, *ROI) for s in samples)


def test_seg_train_preset_keeps_labels_aligned_and_selects_labels(phantom_datalist):
    transform = ct_seg_train_transforms(roi_size=ROI, num_samples=2, pos=1.0, neg=0.0)
    transform.set_random_state(seed=0)
    samples = transform(phantom_datalist[0])
    for sample in samples:
        assert sample["image"].shape == sample["label"].shape == (1, *ROI)
        values = torch.unique(sample["label"])
        assert torch.equal(values, values.round()) and values.min() >= 0 and values.max() <= 7
        assert sample["label"].max() > 0  # pos=1, neg=0: every crop is centred on an organ
    selected = ct_seg_train_transforms(roi_size=ROI, num_samples=4, select_labels=(5, 1), augment=False)
    selected.set_random_state(seed=0)
    labels = torch.stack([s["label"] for s in selected(phantom_datalist[0])])
    assert set(torch.unique(labels).tolist()) <= {0.0, 1.0, 2.0} and labels.max() > 0


def test_seg_train_class_ratios_centre_crops_on_the_chosen_classes(phantom_datalist):
    # one-voxel crops are their own centre: with weight only on kidney_left (4) every crop is kidney
    only_kidney = [0.0] * 8
    only_kidney[4] = 1.0
    transform = ct_seg_train_transforms(roi_size=(1, 1, 1), num_samples=12, class_ratios=only_kidney, augment=False)
    transform.set_random_state(seed=0)
    assert {s["label"].item() for s in transform(phantom_datalist[0])} == {4.0}
    balanced = ct_seg_train_transforms(roi_size=(1, 1, 1), num_samples=200, class_ratios=[1.0] * 8, augment=False)
    balanced.set_random_state(seed=0)
    centres = [s["label"].item() for s in balanced(phantom_datalist[0])]
    assert set(centres) == set(range(8))


def test_seg_val_and_infer_presets_keep_geometry(phantom_datalist):
    validation = ct_seg_val_transforms(spacing=(3.0, 3.0, 3.0))(phantom_datalist[0])
    image, label = validation["image"], validation["label"]
    assert isinstance(image, MetaTensor) and image.shape == label.shape and image.shape[0] == 1
    assert all(s <= 24 for s in image.shape[1:])  # 48 voxels at 1.5 mm -> at most 24 at 3 mm, cropped to the body
    np.testing.assert_allclose(np.diag(image.affine.numpy())[:3], [3.0, 3.0, 3.0])
    assert 0 <= image.min() and image.max() <= 1
    labels = torch.unique(label)
    assert torch.equal(labels, labels.round()) and len(labels) > 3  # nearest-neighbour resampling
    inferred = ct_infer_transforms(spacing=None)({"image": phantom_datalist[0]["image"]})["image"]
    assert inferred.shape == (1, 48, 48, 48)  # no crop, no resampling


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_bad_scan_errors_name_the_file(bad_scans, kind):
    path = bad_scans[kind]
    dataset = build_dataset(
        [{"image": str(path)}], ct_pretrain_transforms(roi_size=ROI, num_samples=1), check_headers=False
    )
    with pytest.raises(BadScanError) as error:
        dataset[0]
    message = str(error.value)
    assert str(path) in message
    assert re.search(EXPECTED[kind], message), message


def test_missing_scan_and_mismatched_label(phantom_datalist, tmp_path):
    missing = tmp_path / "gone.nii.gz"
    with pytest.raises(BadScanError, match=f"scan {missing} \\(key 'image'\\) does not exist"):
        build_dataset([{"image": str(missing)}], ct_pretrain_transforms(), check_headers=False)[0]
    volume, affine = first_image(phantom_datalist)
    cropped_label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(volume[:40].astype(np.uint8), affine), cropped_label)
    item = {"image": phantom_datalist[0]["image"], "label": str(cropped_label)}
    with pytest.raises(BadScanError, match=f"{cropped_label} .*same voxel grid"):
        build_dataset([item], ct_seg_val_transforms(), check_headers=False)[0]
    with pytest.raises(BadScanError, match=f"{cropped_label} .*same voxel grid"):
        validate_datalist([item], keys=("image", "label"))


def test_header_screening_lists_every_bad_scan_at_once(phantom_datalist, bad_scans):
    datalist = [{"image": phantom_datalist[0]["image"]}] + [{"image": str(p)} for p in bad_scans.values()]
    with pytest.raises(BadScanError) as error:
        build_dataset(datalist, ct_pretrain_transforms(roi_size=ROI, num_samples=1))
    message = str(error.value)
    # headers reveal all but truncated .nii.gz data and non-finite voxels
    found_by_header = ["text", "two_channels", "slice_2d", "single_slice", "truncated_nii"]
    assert f"{len(found_by_header)} of {len(datalist)} datalist items are unusable" in message
    assert all(str(bad_scans[kind]) in message for kind in found_by_header)
    assert phantom_datalist[0]["image"] not in message


def test_skip_bad_warns_for_each_skipped_scan(phantom_datalist, bad_scans, caplog):
    good = {"image": phantom_datalist[0]["image"]}
    datalist = [good, {"image": str(bad_scans["truncated"])}, {"image": str(bad_scans["two_channels"])}]
    transform = ct_pretrain_transforms(roi_size=ROI, num_samples=1, augment=False)
    with caplog.at_level(logging.WARNING, logger="medssl.data.dataset"):
        dataset = build_dataset(datalist, transform, skip_bad=True)
        assert len(dataset) == 2 and str(bad_scans["two_channels"]) in caplog.text  # screened out by its header
        sample = dataset[1]  # the truncated scan fails when loaded: the next usable item comes instead
    assert sample[0]["image"].shape == (1, *ROI)
    assert re.search(f"skipping unusable scan .*{re.escape(str(bad_scans['truncated']))}", caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medssl.data.dataset"):
        cached = build_dataset(datalist, transform, cache="cache", skip_bad=True)
    assert len(cached) == 1  # caching reads every scan up front, so both are left out before training
    assert str(bad_scans["truncated"]) in caplog.text and str(bad_scans["two_channels"]) in caplog.text


def test_without_skip_bad_caching_raises_naming_the_file(phantom_datalist, bad_scans):
    datalist = [{"image": phantom_datalist[0]["image"]}, {"image": str(bad_scans["nan"])}]
    with pytest.raises(BadScanError, match=re.escape(str(bad_scans["nan"]))):
        build_dataset(datalist, ct_pretrain_transforms(roi_size=ROI, num_samples=1), cache="cache")


def test_full_validation_catches_what_headers_cannot(bad_scans, caplog):
    datalist = [{"image": str(bad_scans[kind])} for kind in ("truncated", "nan", "inf")]
    assert validate_datalist(datalist) == datalist  # their headers look fine
    with pytest.raises(BadScanError, match="none of the 3"), caplog.at_level(logging.WARNING):
        validate_datalist(datalist, read_data=True, skip_bad=True)
    assert all(item["image"] in caplog.text for item in datalist)


def test_other_formats_and_dicom_series_load(phantom_datalist, tmp_path):
    volume, _ = first_image(phantom_datalist)
    image = itk.image_from_array(np.ascontiguousarray(volume.transpose(2, 1, 0)))  # ITK arrays are (z, y, x)
    image.SetSpacing((1.5, 1.5, 1.5))
    for suffix in (".nrrd", ".mha", ".mhd"):
        itk.imwrite(image, str(tmp_path / f"scan{suffix}"))
        assert read_scan_header(tmp_path / f"scan{suffix}").spatial_shape == (48, 48, 48)
        loaded = LoadScand("image")({"image": str(tmp_path / f"scan{suffix}")})["image"]
        assert loaded.shape == (1, 48, 48, 48)
    series = tmp_path / "series"
    series.mkdir()
    names = itk.NumericSeriesFileNames.New(StartIndex=0, EndIndex=47, IncrementIndex=1)
    names.SetSeriesFormat(str(series / "IM%03d.dcm"))
    writer = itk.ImageSeriesWriter[type(image), itk.Image[itk.SS, 2]].New(
        Input=image, ImageIO=itk.GDCMImageIO.New(), FileNames=names.GetFileNames()
    )
    writer.Update()
    item = {"image": str(series)}
    assert validate_datalist([item]) == [item]
    samples = ct_pretrain_transforms(roi_size=ROI, num_samples=1, augment=False)(item)
    assert samples[0]["image"].shape == (1, *ROI)
    vector = itk.image_from_array(np.zeros((8, 8, 8, 2), np.float32), is_vector=True)
    itk.imwrite(vector, str(tmp_path / "vector.nrrd"))
    with pytest.raises(BadScanError, match="has 2 channels"):
        validate_datalist([{"image": str(tmp_path / "vector.nrrd")}])
