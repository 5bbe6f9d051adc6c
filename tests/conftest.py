"""Shared pytest fixtures: a small synthetic phantom CT dataset written once per test session."""

from pathlib import Path

import pytest

from medssl.data.datalists import datalist_from_decathlon
from medssl.data.phantoms import write_phantom_dataset

PHANTOM_SHAPE = (48, 48, 48)
PHANTOM_SPACING = (1.5, 1.5, 1.5)
PHANTOM_NUM_TRAIN = 4
PHANTOM_NUM_TEST = 1


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory) -> Path:
    """Path of the dataset.json of 4 labelled training phantoms + 1 test phantom (48^3 voxels, 1.5 mm, seed 0).

    Decathlon layout: imagesTr/phantom_00{0..3}.nii.gz (int16 HU), labelsTr/ (uint8 organ ids of
    ``medssl.data.phantoms.LABELS``), imagesTs/phantom_004.nii.gz. Read-only: copy it to modify it.
    """
    root = tmp_path_factory.mktemp("phantom_dataset")
    return write_phantom_dataset(
        root,
        num=PHANTOM_NUM_TRAIN,
        seed=0,
        shape=PHANTOM_SHAPE,
        spacing=PHANTOM_SPACING,
        num_test=PHANTOM_NUM_TEST,
    )


@pytest.fixture(scope="session")
def phantom_datalist(phantom_dataset) -> list[dict]:
    """The training datalist of ``phantom_dataset``: [{"image": abs path, "label": abs path}] x 4."""
    return datalist_from_decathlon(phantom_dataset)
