"""Datalists from folders and Decathlon dataset.json files, splits, shards and the embedded default dataset."""

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest

from medssl.data.datalists import (
    datalist_from_decathlon,
    datalist_from_folder,
    default_dataset,
    load_datalist,
    shard_datalist,
    split_datalist,
)


def touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_folder_lists_every_accepted_scan_and_dicom_series_once(tmp_path):
    expected = [
        touch(tmp_path / "a.nii.gz"),
        touch(tmp_path / "b.NII"),
        touch(tmp_path / "nested" / "c.nrrd"),
        touch(tmp_path / "nested" / "d.mha"),
        touch(tmp_path / "nested" / "e.mhd"),
    ]
    touch(tmp_path / "nested" / "e.raw")  # MetaImage data file: read through e.mhd
    touch(tmp_path / "notes.txt")
    touch(tmp_path / ".hidden.nii.gz")
    touch(tmp_path / ".cache" / "f.nii.gz")
    series = tmp_path / "series1"
    for index in range(3):
        touch(series / f"IM{index}.dcm")
    expected.append(series)
    datalist = datalist_from_folder(tmp_path)
    assert datalist == [{"image": str(p.resolve())} for p in sorted(expected, key=lambda p: str(p.resolve()))]


def test_folder_errors_name_the_folder_and_the_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'}.*nii.gz"):
        datalist_from_folder(tmp_path / "missing")
    touch(tmp_path / "empty" / "readme.txt")
    with pytest.raises(ValueError, match=f"no scans found in {tmp_path / 'empty'}.*\\.nii\\.gz.*\\.dcm"):
        datalist_from_folder(tmp_path / "empty")


def test_decathlon_training_and_test_sections(phantom_dataset):
    training = datalist_from_decathlon(phantom_dataset)
    content = json.loads(phantom_dataset.read_text())
    assert len(training) == content["numTraining"]
    for item in training:
        assert set(item) == {"image", "label"}
        assert Path(item["image"]).is_absolute() and Path(item["image"]).is_file()
        assert Path(item["label"]).is_file() and "labelsTr" in item["label"]
    test = datalist_from_decathlon(phantom_dataset, section="test")
    assert len(test) == content["numTest"] and set(test[0]) == {"image"} and Path(test[0]["image"]).is_file()


def test_decathlon_errors_name_the_json_and_what_is_missing(phantom_dataset, tmp_path):
    with pytest.raises(ValueError, match=f"{phantom_dataset}.*'validation'.*training"):
        datalist_from_decathlon(phantom_dataset, section="validation")
    copy = tmp_path / "dataset.json"
    content = json.loads(phantom_dataset.read_text())
    content["training"][0]["label"] = "./labelsTr/gone.nii.gz"
    copy.write_text(json.dumps(content))
    shutil.copytree(phantom_dataset.parent / "imagesTr", tmp_path / "imagesTr")
    with pytest.raises(FileNotFoundError) as error:
        datalist_from_decathlon(copy)
    message = str(error.value)
    assert str(copy) in message and str(tmp_path / "labelsTr" / "gone.nii.gz") in message
    assert str(tmp_path / "labelsTr" / "phantom_001.nii.gz") in message  # every missing file is listed
    touch(tmp_path / "broken.json", "{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        datalist_from_decathlon(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="nothing.json does not exist"):
        datalist_from_decathlon(tmp_path / "nothing.json")


def test_load_datalist_dispatches(phantom_dataset, tmp_path):
    from_json = load_datalist(phantom_dataset)
    assert load_datalist(phantom_dataset.parent) == from_json and "label" in from_json[0]
    plain = tmp_path / "plain"
    shutil.copytree(phantom_dataset.parent / "imagesTr", plain)
    assert [Path(item["image"]).name for item in load_datalist(plain)] == [Path(i["image"]).name for i in from_json]
    with pytest.raises(ValueError, match="single file"):
        load_datalist(plain / "phantom_000.nii.gz")


def test_split_is_deterministic_disjoint_and_complete():
    datalist = [{"image": f"/x/{i}.nii.gz"} for i in range(10)]
    train, val = split_datalist(datalist, num_val=3, seed=0)
    assert len(train) == 7 and len(val) == 3
    assert sorted(train + val, key=lambda d: int(Path(d["image"]).name.split(".")[0])) == datalist
    assert split_datalist(datalist, num_val=3, seed=0) == (train, val)
    assert any(split_datalist(datalist, num_val=3, seed=s)[1] != val for s in range(1, 5))
    assert len(split_datalist(datalist, num_val=0.25, seed=0)[1]) == 2  # a fraction, rounded
    for bad in (10, -1, 1.5):
        with pytest.raises(ValueError, match="10 items"):
            split_datalist(datalist, num_val=bad)


def test_shards_cover_everything_with_equal_sizes():
    datalist = [{"image": str(i)} for i in range(5)]
    shards = [shard_datalist(datalist, rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    assert {d["image"] for shard in shards for d in shard} == {str(i) for i in range(5)}
    assert shard_datalist(datalist, 0, 1) == datalist
    with pytest.raises(ValueError, match="rank 2"):
        shard_datalist(datalist, 2, 2)


def test_default_dataset_generates_once_and_says_so(tmp_path, caplog):
    root = tmp_path / "data"
    with caplog.at_level(logging.INFO, logger="medssl.data.datalists"):
        json_path = default_dataset(root, num=2, seed=1, shape=(24, 24, 24))
    assert json_path == root / "dataset.json"
    assert f"no dataset given: using 2 embedded synthetic phantom CT scans in {root}" in caplog.text
    datalist = load_datalist(json_path)
    assert len(datalist) == 2
    stamps = {item["image"]: os.stat(item["image"]).st_mtime_ns for item in datalist}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medssl.data.datalists"):
        assert default_dataset(root, num=2, seed=1, shape=(24, 24, 24)) == json_path
    assert "no dataset given" in caplog.text and "generated" not in caplog.text
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps  # reused, not rewritten
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_default_dataset_regenerates_for_other_settings_and_never_overwrites_user_data(tmp_path, caplog):
    root = tmp_path / "data"
    default_dataset(root, num=1, seed=0, shape=(24, 24, 24))
    with caplog.at_level(logging.WARNING, logger="medssl.data.datalists"):
        default_dataset(root, num=2, seed=0, shape=(24, 24, 24))
    assert "regenerating" in caplog.text and len(load_datalist(root)) == 2
    user = tmp_path / "user"
    touch(user / "dataset.json", json.dumps({"training": []}))
    with pytest.raises(FileExistsError, match=f"{user / 'dataset.json'} is not an embedded phantom dataset"):
        default_dataset(user, num=1, shape=(24, 24, 24))


def test_default_dataset_reads_a_dataset_without_a_contrast_setting_as_full_contrast(tmp_path, caplog):
    root = tmp_path / "data"
    json_path = default_dataset(root, num=1, seed=0, shape=(24, 24, 24))
    content = json.loads(json_path.read_text())
    del content["generator"]["soft_tissue_contrast"]  # as written before the setting existed
    json_path.write_text(json.dumps(content))
    with caplog.at_level(logging.WARNING, logger="medssl.data.datalists"):
        default_dataset(root, num=1, seed=0, shape=(24, 24, 24))
        assert "regenerating" not in caplog.text
        default_dataset(root, num=1, seed=0, shape=(24, 24, 24), soft_tissue_contrast=0.0)
    assert "regenerating" in caplog.text
    assert json.loads(json_path.read_text())["generator"]["soft_tissue_contrast"] == 0.0


def test_default_dataset_is_safe_under_concurrent_callers(tmp_path):
    root = tmp_path / "data"
    results, errors = [], []

    def call():
        try:
            results.append(default_dataset(root, num=2, seed=0, shape=(24, 24, 24)))
        except Exception as error:  # collected: a thread's exception would not fail the test
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [root / "dataset.json"] * 3
    assert len(datalist_from_decathlon(root / "dataset.json")) == 2
    assert sorted(p.name for p in root.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
