"""Each bundle's multi_gpu_train.json on CPU (gloo) with 2 processes, the way torchrun runs it."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from medssl.data import write_phantom_dataset

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
TINY = {
    "hiend_mae": dict(roi_size=[32, 32, 32], decoder_hidden_size=48, decoder_num_heads=4, num_samples=1,
                      val_num_samples=1, batch_size=1, num_val=2, epochs=1, warmup_epochs=1, val_interval=1,
                      figure_interval=1, num_workers=0, cache="none"),
    "seg_finetune": dict(roi_size=[32, 32, 32], num_samples=1, batch_size=1, num_val=2, epochs=1, warmup_epochs=1,
                         val_interval=1, num_workers=0, sw_batch_size=1),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, bundle: str, root: str, dataset: str, port: int, world_size: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from monai.bundle import ConfigWorkflow

    configs = BUNDLES / bundle / "configs"
    workflow = ConfigWorkflow(
        config_file=[str(configs / name) for name in ("train.json", "demo.json", "multi_gpu_train.json")],
        meta_file=str(configs / "metadata.json"),
        workflow_type="train",
        bundle_root=root,
        dataset_dir=dataset,
        **TINY[bundle],
    )
    workflow.initialize()
    workflow.run()
    network = workflow.parser.get_parsed_content("network")
    sampler = workflow.parser.get_parsed_content("train#sampler")
    torch.save(
        {"weights": network.module.state_dict(), "indices": torch.tensor(list(iter(sampler)))},
        Path(root) / f"rank{rank}.pt",
    )
    workflow.finalize()


@pytest.mark.parametrize("bundle", sorted(TINY))
def test_two_cpu_processes_train_in_step(bundle, tmp_path):
    dataset = write_phantom_dataset(tmp_path / "data", num=6, seed=0, shape=(48, 48, 48))
    root = tmp_path / "run"
    mp.spawn(worker, args=(bundle, str(root), str(dataset), free_port(), 2), nprocs=2, join=True)

    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # DistributedSampler gave each rank its own scans.
    assert not set(ranks[0]["indices"].tolist()) & set(ranks[1]["indices"].tolist())
    # Gradients were averaged: both replicas hold identical weights after training.
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), key
    # Exactly one model, one checkpoint and one TensorBoard log, written by rank 0, without "module.".
    saved = torch.load(root / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in saved)
    assert saved.keys() == ranks[0]["weights"].keys()
    assert len(list((root / "models").glob("checkpoint_epoch=*.pt"))) == 1
    assert len(list((root / "eval" / "tb").glob("events.out.tfevents.*"))) == 1
