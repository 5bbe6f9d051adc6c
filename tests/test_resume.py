"""Kill a real training run with SIGKILL, run the same command again: nothing is lost."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from medssl.data import write_phantom_dataset

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "hiend_mae"
TINY = [
    "--epochs", "2", "--warmup_epochs", "1", "--val_interval", "5", "--figure_interval", "5",
    "--batch_size", "1", "--num_samples", "2", "--val_num_samples", "1", "--num_workers", "0",
    "--cache", "none", "--roi_size", "[32,32,32]", "--num_val", "1",
    "--decoder_hidden_size", "48", "--decoder_num_heads", "4",
]


def command(root: Path, dataset: Path) -> list[str]:
    configs = [str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "demo.json")]
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs).replace(" ", ""),
            "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
            "--bundle_root", str(root), "--dataset_dir", str(dataset), *TINY]


def run_to_end(root: Path, dataset: Path) -> None:
    result = subprocess.run(command(root, dataset), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_sigkill_then_same_command_gives_the_uninterrupted_weights(tmp_path):
    dataset = write_phantom_dataset(tmp_path / "data", num=4, seed=0, shape=(48, 48, 48))
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    run_to_end(uninterrupted, dataset)

    process = subprocess.Popen(command(interrupted, dataset), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_checkpoint = interrupted / "models" / "checkpoint_epoch=1.pt"
    deadline = time.monotonic() + 300
    while not first_checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert first_checkpoint.exists(), "the run ended or timed out before its first checkpoint"
    assert not (interrupted / "models" / "model.pt").exists(), "the run finished before it could be killed"

    run_to_end(interrupted, dataset)
    expected = torch.load(uninterrupted / "models" / "model.pt", weights_only=True)
    resumed = torch.load(interrupted / "models" / "model.pt", weights_only=True)
    assert expected.keys() == resumed.keys()
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not different, f"resumed weights differ from the uninterrupted run in {different[:5]}"
    assert [p.name for p in (interrupted / "models").glob("checkpoint*.pt")] == ["checkpoint_epoch=2.pt"]
