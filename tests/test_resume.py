"""Kill a real training run with SIGKILL mid-epoch, run the same command again: nothing is lost;
run it with another learning rate: the checkpoint is refused.

Every bundle that trains is run three times through ``python -m monai.bundle run`` (MONAI's CLI
entry point, executed in a fresh process per run): once to the end, once killed with SIGKILL
during its second epoch, once more with the same command. The resumed run must end with the
uninterrupted run's weights and last checkpoint, bit for bit.

Each run is a child of a multiprocessing forkserver that has imported torch and MONAI once, so
the twelve runs do not each pay the interpreter's import time on a loaded machine.
"""

import multiprocessing
import os
import runpy
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
# Tiny sizes, two epochs of two iterations (2 of the 4 phantoms train, 2 validate) and a
# validation every epoch, so each checkpoint is written after a validation that drew random numbers.
COMMON = {"epochs": 2, "num_val": 2, "val_interval": 1, "batch_size": 1, "num_samples": 1, "num_workers": 0}
TINY = {
    "hiend_mae": {
        "warmup_epochs": 1, "figure_interval": 5, "val_num_samples": 1, "cache": "none",
        "roi_size": [32, 32, 32], "decoder_hidden_size": 48, "decoder_num_heads": 4,
    },
    "maesil": {
        "warmup_epochs": 1, "figure_interval": 5, "val_num_samples": 1, "cache": "none",
        "superpatch_size": [32, 32, 32], "encoder_layers": 2, "decoder_hidden_size": 48, "decoder_layers": 1,
        "decoder_heads": 4,
    },
    "frepa": {  # the adversarial form: the discriminator and its optimizer must resume too
        "figure_interval": 5, "val_num_samples": 1, "cache": "none", "roi_size": [32, 32, 32],
        "decoder_channels": 16, "discriminator_hidden": 16, "embedding_loss": "adversarial",
    },
    "seg_finetune": {"warmup_epochs": 1, "roi_size": [32, 32, 32], "cache_rate": 0, "sw_batch_size": 2},
}
SECOND_EPOCH_STARTED = "Epoch: 2/2, Iter: 1/"


def run_cli(argv: list[str], log: str) -> None:
    """``python -m monai.bundle <argv>`` in this process, stdout and stderr line-buffered into log."""
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(descriptor, 1)  # also for loggers that kept the forkserver's stdout
    os.dup2(descriptor, 2)
    sys.stdout = sys.stderr = open(descriptor, "w", buffering=1)
    sys.argv = ["monai.bundle", *argv]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)


@pytest.fixture(scope="module")
def cli():
    """Start a CLI run in a child process; the forkserver imports the heavy modules once."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "monai.bundle", "medssl.data", "medssl.engine", "medssl.encoders"])

    def start(argv: list[str], log: Path) -> multiprocessing.Process:
        process = context.Process(target=run_cli, args=(argv, str(log)))
        process.start()
        return process

    return start


def arguments(bundle: str, root: Path, dataset: Path) -> list[str]:
    configs = BUNDLES / bundle / "configs"
    overrides = [arg for key, value in (COMMON | TINY[bundle]).items()
                 for arg in (f"--{key}", str(value).replace(" ", ""))]
    return ["run", "--config_file", str([str(configs / "train.json"), str(configs / "demo.json")]).replace(" ", ""),
            "--meta_file", str(configs / "metadata.json"), "--bundle_root", str(root),
            "--dataset_dir", str(dataset), *overrides]


def finish(process: multiprocessing.Process, log: Path) -> str:
    process.join(timeout=600)
    output = log.read_text()
    assert process.exitcode == 0, output[-4000:]
    return output


def assert_identical(expected, actual, where: str = "") -> None:
    """Tensors equal bit for bit, everything else equal, recursively through dicts and lists."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(expected, actual), f"differs at {where}"
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), f"keys differ at {where}: {expected.keys() ^ actual.keys()}"
        for key in expected:
            assert_identical(expected[key], actual[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), f"lengths differ at {where}"
        for index, (e, a) in enumerate(zip(expected, actual)):
            assert_identical(e, a, f"{where}[{index}]")
    else:
        assert expected == actual, f"{expected!r} != {actual!r} at {where}"


@pytest.mark.parametrize("bundle", sorted(TINY))
def test_sigkill_mid_epoch_then_same_command_gives_the_uninterrupted_run(bundle, cli, phantom_dataset, tmp_path):
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    reference = cli(arguments(bundle, uninterrupted, phantom_dataset), tmp_path / "uninterrupted.log")
    killed_log = tmp_path / "killed.log"
    victim = cli(arguments(bundle, interrupted, phantom_dataset), killed_log)

    first_checkpoint = interrupted / "models" / "checkpoint_epoch=1.pt"
    deadline = time.monotonic() + 300
    while victim.is_alive() and time.monotonic() < deadline:
        if first_checkpoint.exists() and SECOND_EPOCH_STARTED in killed_log.read_text():
            break
        time.sleep(0.02)
    victim.kill()  # SIGKILL, sent only while the process has not been reaped
    victim.join()
    assert victim.exitcode == -signal.SIGKILL, killed_log.read_text()[-4000:]
    assert first_checkpoint.exists(), "the run was killed before its first checkpoint"
    assert not (interrupted / "models" / "checkpoint_epoch=2.pt").exists(), "the run ended its second epoch first"

    resumed_log = tmp_path / "resumed.log"
    resumed = finish(cli(arguments(bundle, interrupted, phantom_dataset), resumed_log), resumed_log)
    finish(reference, tmp_path / "uninterrupted.log")
    assert f"resuming from {first_checkpoint}" in resumed and "Epoch: 1/2" not in resumed, "the run did not resume"

    for name in ("model.pt", "checkpoint_epoch=2.pt"):  # for seg_finetune model.pt is the best model
        expected = torch.load(uninterrupted / "models" / name, weights_only=True)
        assert_identical(expected, torch.load(interrupted / "models" / name, weights_only=True), name)
    assert sorted(p.name for p in (interrupted / "models").glob("checkpoint*.pt")) == ["checkpoint_epoch=2.pt"]
    checkpoint = torch.load(interrupted / "models" / "checkpoint_epoch=2.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 4 and checkpoint["evaluator"]["best_metric_epoch"] in (1, 2)

    changed_log = tmp_path / "changed.log"  # the same folder run on with another learning rate is refused
    other_rate = [*arguments(bundle, interrupted, phantom_dataset), "--epochs", "3", "--learning_rate", "0.5"]
    changed = cli(other_rate, changed_log)
    changed.join(timeout=600)
    assert changed.exitcode != 0 and "was written with other settings (learning_rate: " in changed_log.read_text()
