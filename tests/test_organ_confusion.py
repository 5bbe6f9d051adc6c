import json
import shutil

import numpy as np
import pytest
import torch

from bench_script import load_bench_script
from medssl.data import LABEL_IDS, default_dataset

confusion = load_bench_script("organ_confusion")


def test_label_shares_count_the_organs_voxels_by_predicted_label():
    label = np.array([0, 7, 7, 7, 1, 7])
    prediction = np.array([7, 7, 0, 3, 1, 7])
    assert confusion.label_shares(prediction, label, organ=7, num_classes=8).tolist() == [1, 0, 0, 1, 0, 0, 0, 2]


def _finished_run(runs, start: str, seed: int, settings: dict, predicted: int) -> None:
    """A run folder as the study leaves it, whose network labels every voxel ``predicted``."""
    folder = runs / "finetune" / start / f"k1_seed{seed}"
    command = ("(cd bundles/seg_finetune && python -m monai.bundle run --config_file "
               f"'[\"configs/train.json\",\"configs/demo.json\"]' --bundle_root {folder} --seed {seed})")
    (folder / "models").mkdir(parents=True)
    (folder / "train.done.json").write_text(json.dumps({"command": command, "settings": settings}))
    network = confusion.run_parser(folder, runs / "data/test/dataset.json").get_parsed_content("network_def")
    state = network.state_dict()
    weight, bias = list(state)[-2:]  # the output convolution
    assert state[bias].shape == (len(LABEL_IDS),)  # background included
    state[weight].zero_()
    state[bias].zero_()
    state[bias][predicted] = 1.0
    torch.save(state, folder / "models" / "model.pt")


def test_each_run_gives_the_organs_voxels_the_label_its_network_predicts(tmp_path, capsys):
    runs = tmp_path / "runs"
    default_dataset(runs / "data" / "test", num=2, seed=2000, shape=(48, 48, 48))
    finetune = default_dataset(runs / "data" / "finetune", num=3, seed=0, shape=(48, 48, 48))
    shutil.copy(finetune, finetune.with_name("dataset_seed0.json"))  # the study's labelled order for seed 0
    settings = {"seed": 0, "network_kind": "cnn", "encoder_size": "tiny", "roi_size": [32, 32, 32],
                "encoder_args": {}, "amp": False, "num_val": 2}
    _finished_run(runs, "scratch_cnn", 0, settings, predicted=LABEL_IDS["aorta"])
    _finished_run(runs, "frepa_cnn", 0, settings, predicted=LABEL_IDS["bone"])
    (runs / "finetune" / "frepa_cnn" / "k1_seed1").mkdir()  # unfinished: no train.done.json

    aorta = confusion.run_shares(runs / "finetune/scratch_cnn/k1_seed0", LABEL_IDS["aorta"])
    assert aorta.sum() > 0 and aorta[LABEL_IDS["aorta"]] == aorta.sum()
    labelled = confusion.run_shares(runs / "finetune/scratch_cnn/k1_seed0", LABEL_IDS["aorta"], "labelled")
    assert 0 < labelled.sum() != aorta.sum()  # one fine-tuning scan (k = 1), not the two held-out ones

    confusion.main(["--runs", str(runs), "--organ", "aorta", "--starts", "scratch_cnn", "frepa_cnn"])
    out = capsys.readouterr().out
    assert "scratch_cnn k1_seed0: aorta recall 100%" in out and "frepa_cnn k1_seed0: aorta recall 0%" in out
    assert f"| frepa_cnn | 0 | {aorta.sum()} | 0 | 0 | 0 | 0 | 0 | 0 | 100 | 0 |" in out  # bone's column
    assert "k1_seed1" not in out
    with pytest.raises(SystemExit):
        confusion.main(["--runs", str(runs), "--organ", "heart", "--starts", "scratch_cnn"])
