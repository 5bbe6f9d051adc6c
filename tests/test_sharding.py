"""Datalist sharding by rank, and a persistent cache folder shared by several processes."""

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from monai.transforms import Lambda

from medssl.data.dataset import PersistentScanDataset
from medssl.data.sharding import rank_shard

NUM_ITEMS = 12


def scans(count: int) -> list[dict]:
    return [{"image": f"/data/scan_{index}.nii.gz"} for index in range(count)]


def names(datalist: list[dict]) -> list[str]:
    return [Path(item["image"]).name for item in datalist]


def test_training_shards_are_dealt_round_robin_and_padded_to_equal_length():
    shards = [names(rank_shard(scans(5), even_divisible=True, rank=r, world_size=2)) for r in range(2)]
    assert shards == [["scan_0.nii.gz", "scan_2.nii.gz", "scan_4.nii.gz"], ["scan_1.nii.gz", "scan_3.nii.gz", "scan_0.nii.gz"]]


def test_validation_shards_cover_every_scan_exactly_once():
    shards = [names(rank_shard(scans(7), even_divisible=False, rank=r, world_size=3)) for r in range(3)]
    assert [len(shard) for shard in shards] == [3, 2, 2]
    assert sorted(sum(shards, [])) == sorted(names(scans(7)))


def test_without_a_process_group_the_whole_datalist_is_this_process_s():
    assert rank_shard(scans(3), even_divisible=False) == scans(3)


@pytest.mark.parametrize("even_divisible", [True, False])
def test_too_few_scans_for_the_processes_is_an_error_naming_the_datalist(even_divisible):
    with pytest.raises(ValueError, match="val_datalist holds 1 scans for 2 processes.*num_val"):
        rank_shard(scans(1), even_divisible, name="val_datalist", rank=1, world_size=2)
    with pytest.raises(ValueError, match="train_datalist is empty"):
        rank_shard([], even_divisible, name="train_datalist", rank=0, world_size=2)


def synthetic_volume(item: dict) -> dict:
    """A deterministic 'loaded scan' per item, big enough that writing it takes a while."""
    generator = torch.Generator().manual_seed(item["seed"])
    return {"image": torch.rand(1, 48, 48, 48, generator=generator)}


def test_a_cache_file_is_written_beside_its_final_name_and_renamed_into_place(tmp_path, monkeypatch):
    renames = []
    rename = os.replace

    def recording_rename(source, target):
        # At the rename the complete file exists under a hidden temporary name in the cache folder
        # and nothing is yet at the final name that readers open.
        renames.append((Path(source), Path(target), Path(source).stat().st_size, Path(target).exists()))
        rename(source, target)

    monkeypatch.setattr(os, "replace", recording_rename)
    dataset = PersistentScanDataset([{"seed": 0}], Lambda(synthetic_volume), cache_dir=tmp_path)
    assert torch.equal(dataset[0]["image"], synthetic_volume({"seed": 0})["image"])

    (source, target, size, target_existed), = renames
    assert source.parent == target.parent == tmp_path and source.name.startswith(".")
    assert size > 48**3 * 4 and not target_existed
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert torch.equal(dataset[0]["image"], synthetic_volume({"seed": 0})["image"])  # now read from the cache


def fill_cache(rank: int, cache_dir: str, temp_dir: str, barrier, results: str) -> None:
    """Both processes read every item of one dataset, at the same time and in the same order."""
    torch.set_num_threads(1)
    os.environ["TMPDIR"] = temp_dir  # MONAI would stage its files here; ours must not depend on it
    tempfile.tempdir = None
    dataset = PersistentScanDataset([{"seed": s} for s in range(NUM_ITEMS)], Lambda(synthetic_volume), cache_dir=cache_dir)
    barrier.wait()
    matches = [bool(torch.equal(dataset[i]["image"], synthetic_volume({"seed": i})["image"])) for i in range(NUM_ITEMS)]
    torch.save(matches, Path(results) / f"rank{rank}.pt")


def test_two_processes_fill_one_cache_folder(tmp_path):
    cache_dir, results = tmp_path / "cache", tmp_path / "results"
    cache_dir.mkdir()
    results.mkdir()
    # Stage on another filesystem when there is one (/dev/shm): that is where a move turns into a
    # copy that other readers can catch half-written.
    other_filesystem = Path("/dev/shm")
    if other_filesystem.is_dir() and os.access(other_filesystem, os.W_OK):
        temp_dir = tempfile.mkdtemp(dir=other_filesystem)
    else:
        temp_dir = str(tmp_path / "tmp")
        os.mkdir(temp_dir)
    barrier = mp.get_context("spawn").Barrier(2)
    mp.spawn(fill_cache, args=(str(cache_dir), temp_dir, barrier, str(results)), nprocs=2, join=True)

    for rank in range(2):
        assert torch.load(results / f"rank{rank}.pt", weights_only=True) == [True] * NUM_ITEMS
    cached = sorted(cache_dir.iterdir())
    assert len(cached) == NUM_ITEMS and not any(p.name.startswith(".") for p in cached)
    reference = {synthetic_volume({"seed": s})["image"].sum().item() for s in range(NUM_ITEMS)}
    assert {torch.load(p, weights_only=True)["image"].sum().item() for p in cached} == reference
    os.rmdir(temp_dir)
