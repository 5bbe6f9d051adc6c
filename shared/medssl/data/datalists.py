"""Datalists (lists of ``{"image": path, ...}`` dicts) from a folder of scans or a Decathlon dataset.json.

Also: a deterministic train/validation split, sharding for distributed runs, and the embedded
default dataset (synthetic phantoms generated on first use) that every bundle falls back to when
the user gives no data.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import load_decathlon_datalist, partition_dataset

from medssl.data.phantoms import GENERATOR, write_phantom_dataset
from medssl.data.scans import ACCEPTED_SCANS, DICOM_EXTENSION, SCAN_EXTENSIONS

__all__ = [
    "datalist_from_folder",
    "datalist_from_decathlon",
    "load_datalist",
    "split_datalist",
    "shard_datalist",
    "default_dataset",
]

logger = logging.getLogger(__name__)


def datalist_from_folder(
    folder: str | os.PathLike, extensions: Sequence[str] = SCAN_EXTENSIONS
) -> list[dict[str, str]]:
    """Every scan under ``folder`` (searched recursively, sorted by path) as ``{"image": absolute path}``.

    A file counts when its name ends with one of ``extensions`` (case-insensitive); a folder that
    directly holds ``.dcm`` files counts as one DICOM series (MONAI's ITK reader loads a folder).
    Hidden files and folders (name starting with ".") are skipped.

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a folder.
        ValueError: no scan was found.
    """
    root = Path(folder).expanduser()
    accepted = tuple(e.lower() for e in extensions)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {root} does not exist or is not a folder; give a folder of CT scans "
            f"(files ending in {', '.join(accepted)}, or DICOM series folders) or a Decathlon dataset.json"
        )
    scans: list[str] = []
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        visible = [f for f in files if not f.startswith(".")]
        if any(f.lower().endswith(DICOM_EXTENSION) for f in visible):
            scans.append(str(Path(current).resolve()))
        scans.extend(str((Path(current) / f).resolve()) for f in visible if f.lower().endswith(accepted))
    if not scans:
        raise ValueError(
            f"no scans found in {root}: expected files ending in {', '.join(accepted)} or sub-folders of DICOM "
            f"({DICOM_EXTENSION}) files, searched recursively"
        )
    return [{"image": path} for path in sorted(scans)]


def datalist_from_decathlon(dataset_json: str | os.PathLike, section: str = "training") -> list[dict]:
    """The ``section`` list of a Medical Segmentation Decathlon ``dataset.json``, paths made absolute.

    Relative paths are resolved against the folder of the json file (MONAI's
    ``load_decathlon_datalist``); test sections given as plain strings become ``{"image": path}``.

    Raises:
        FileNotFoundError: the json file, or any image/label it references, does not exist (all
            missing paths are listed).
        ValueError: the file is not valid JSON, or has no non-empty ``section`` list.
    """
    json_path = Path(dataset_json).expanduser().resolve()
    if not json_path.is_file():
        raise FileNotFoundError(
            f"dataset file {json_path} does not exist; give a Decathlon dataset.json or a folder of scans"
        )
    try:
        content = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"dataset file {json_path} is not valid JSON ({error}); expected a Decathlon dataset.json"
        ) from error
    if not isinstance(content, dict) or not isinstance(content.get(section), list):
        present = sorted(k for k, v in content.items() if isinstance(v, list)) if isinstance(content, dict) else []
        raise ValueError(f"dataset file {json_path} has no '{section}' list; lists present: {present or 'none'}")
    if not content[section]:
        raise ValueError(f"the '{section}' list of dataset file {json_path} is empty; it must name at least one scan")
    datalist = load_decathlon_datalist(
        json_path, is_segmentation=True, data_list_key=section, base_dir=json_path.parent
    )
    missing = []
    for item in datalist:
        for key in ("image", "label"):
            paths = item.get(key, [])
            for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
                if not Path(path).exists():
                    missing.append(str(path))
    if missing:
        listed = "\n  ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise FileNotFoundError(
            f"{len(missing)} file(s) referenced by the '{section}' list of {json_path} do not exist "
            f"(paths are relative to the json's folder):\n  {listed}"
        )
    return datalist


def load_datalist(path: str | os.PathLike, section: str = "training") -> list[dict]:
    """A datalist from a Decathlon ``dataset.json`` file, a folder holding one, or a folder of scans."""
    source = Path(path).expanduser()
    if source.is_file():
        if source.suffix.lower() != ".json":
            raise ValueError(
                f"{source} is a single file; give a folder of scans ({ACCEPTED_SCANS}) or a Decathlon dataset.json"
            )
        return datalist_from_decathlon(source, section)
    if (source / "dataset.json").is_file():
        logger.info("using %s (Decathlon layout, section '%s')", source / "dataset.json", section)
        return datalist_from_decathlon(source / "dataset.json", section)
    return datalist_from_folder(source)


def split_datalist(datalist: Sequence[dict], num_val: int | float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split into (train, validation) by a seeded shuffle; both keep the datalist's order.

    Args:
        num_val: validation size, a count (int) or a fraction in (0, 1) of the datalist (at least 1).
        seed: the same seed always gives the same split.
    """
    total = len(datalist)
    count = max(1, round(num_val * total)) if isinstance(num_val, float) and 0 < num_val < 1 else num_val
    if not isinstance(count, (int, np.integer)) or not 0 <= count < total:
        raise ValueError(
            f"num_val={num_val} does not fit a datalist of {total} items: give a count in [0, {total - 1}] "
            "or a fraction in (0, 1), leaving at least one training item"
        )
    val_index = set(np.random.default_rng(seed).permutation(total)[: int(count)].tolist())
    train = [item for i, item in enumerate(datalist) if i not in val_index]
    val = [item for i, item in enumerate(datalist) if i in val_index]
    return train, val


def shard_datalist(datalist: Sequence[dict], rank: int, world_size: int) -> list[dict]:
    """The part of ``datalist`` that process ``rank`` of ``world_size`` trains on.

    Items are dealt round-robin; shards are padded by repeating items so that every rank gets the
    same number of items (unequal shards make distributed ranks wait on each other forever).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}; expected 0 <= rank < world_size")
    if not datalist:
        raise ValueError("cannot shard an empty datalist")
    return list(partition_dataset(list(datalist), num_partitions=world_size, even_divisible=True)[rank])


def _phantom_settings(json_path: Path) -> dict | None:
    """The generator settings recorded in a phantom dataset.json (None when absent or not a phantom set)."""
    try:
        content = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return None
    generator = content.get("generator") if isinstance(content, dict) else None
    if not isinstance(generator, dict) or generator.get("module") != GENERATOR:
        return None
    return {"num": content.get("numTraining"), **{k: generator.get(k) for k in ("seed", "shape", "spacing")},
            # datasets written before the setting existed have full contrast
            "soft_tissue_contrast": generator.get("soft_tissue_contrast", 1.0)}


def default_dataset(
    root: str | os.PathLike,
    num: int = 8,
    seed: int = 0,
    shape: Sequence[int] = (96, 96, 96),
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
    soft_tissue_contrast: float = 1.0,
) -> Path:
    """The embedded default data: ``num`` synthetic phantom CT scans in ``root``, generated on first use.

    ``seed``, ``shape``, ``spacing`` and ``soft_tissue_contrast`` are the phantom generator's
    (medssl.data.phantoms.write_phantom_dataset).

    Idempotent: a phantom dataset already in ``root`` with the same settings is reused; one with
    other settings is regenerated (with a warning). Safe when several processes call it at once
    (e.g. the ranks of a distributed run): each generates into a hidden temporary folder and moves
    finished files into place with atomic renames, ``dataset.json`` last, so a reader never sees a
    dataset.json whose scans are missing or half-written (concurrent writers write identical bytes).

    Returns:
        path of ``root/dataset.json`` (Decathlon layout with images in imagesTr/, organ labels in labelsTr/).

    Raises:
        FileExistsError: ``root/dataset.json`` exists but is not a phantom dataset (never overwritten).
    """
    settings = {
        "num": int(num),
        "seed": int(seed),
        "shape": [int(s) for s in shape],
        "spacing": [float(s) for s in spacing],
        "soft_tissue_contrast": float(soft_tissue_contrast),
    }
    folder = Path(root).expanduser().resolve()
    json_path = folder / "dataset.json"
    present = _phantom_settings(json_path) if json_path.is_file() else None
    if json_path.is_file() and present is None:
        raise FileExistsError(
            f"{json_path} is not an embedded phantom dataset; pass it as the dataset to use it, "
            "or give the default dataset another folder"
        )
    if present != settings:
        if present is not None:
            logger.warning(
                "regenerating the phantom dataset in %s: it was made with %s, now asked for %s",
                folder,
                present,
                settings,
            )
        start = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".phantoms-", dir=folder))
        try:
            written = write_phantom_dataset(staging, num=num, seed=seed, shape=shape, spacing=spacing,
                                            soft_tissue_contrast=soft_tissue_contrast)
            for sub in ("imagesTr", "labelsTr"):
                (folder / sub).mkdir(exist_ok=True)
                for scan in sorted((staging / sub).iterdir()):
                    os.replace(scan, folder / sub / scan.name)
            os.replace(written, json_path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("generated %d synthetic phantom CT scans in %.1f s", num, time.perf_counter() - start)
    datalist_from_decathlon(json_path)  # every referenced scan must be there
    logger.info("no dataset given: using %d embedded synthetic phantom CT scans in %s", num, folder)
    return json_path
