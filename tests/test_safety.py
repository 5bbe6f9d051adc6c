"""Weights come from strangers: loading never runs code hidden in a checkpoint."""

import pickle
import re
from pathlib import Path

import pytest
import torch

from medssl.zoo import read_pretrained_state

ROOT = Path(__file__).resolve().parents[1]


class RunsCode:
    """Unpickling this object would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_pickled_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "code_ran"
    weights = tmp_path / "model.pt"
    torch.save({"encoder.norm.weight": torch.ones(2), "payload": RunsCode(marker)}, weights)
    with pytest.raises(pickle.UnpicklingError):
        read_pretrained_state(model_path=weights)
    assert not marker.exists()


def test_every_torch_load_in_the_project_is_weights_only():
    offenders = []
    for path in [*ROOT.glob("shared/**/*.py"), *ROOT.glob("bundles/**/*.py"), *ROOT.glob("bundles/**/*.json"),
                 *ROOT.glob("bench/**/*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for call in re.findall(r"torch\.load\([^)]*\)?", line):
                if "weights_only=True" not in call and "weights_only=True" not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "torch.load without weights_only=True:\n" + "\n".join(offenders)
