"""`make demo`'s driver: which bundle commands it runs, without running them."""

from pathlib import Path

import pytest

from medssl import demo


@pytest.mark.parametrize("decoder", ["default", "linear"])
def test_both_starts_fine_tune_and_evaluate_the_same_network(decoder, tmp_path, monkeypatch, capsys):
    calls = []

    def recorded(bundle: Path, configs: str, *overrides: str, log=None) -> float:
        calls.append((bundle.name, configs, overrides))
        return 60.0

    monkeypatch.setattr(demo, "run_bundle", recorded)
    monkeypatch.setattr(demo, "default_dataset", lambda folder, **kwargs: folder / "dataset.json")
    monkeypatch.setattr(demo, "read_metric", lambda path, name: 0.5 if "pretrained" in str(path) else 0.4)
    demo.main(["--out", str(tmp_path), "--decoder", decoder, "--steps", "12"])

    assert [bundle for bundle, _, _ in calls] == ["hiend_mae"] + ["seg_finetune"] * 4
    finetune = [overrides for bundle, _, overrides in calls if bundle == "seg_finetune"]
    for overrides in finetune:
        assert overrides[overrides.index("--decoder") + 1] == decoder
    assert ["--pretrained#model_path" in overrides for overrides in finetune] == [True, False, False, False]
    printed = capsys.readouterr().out
    assert ("UNETR" if decoder == "default" else "linear head") in printed
    assert "from Hi-End-MAE pretraining: 0.5000" in printed and "from scratch:                0.4000" in printed
