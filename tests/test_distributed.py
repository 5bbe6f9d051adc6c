"""Each bundle's multi_gpu_train.json on CPU (gloo) with 2 processes, the way torchrun runs it."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from medssl.data import write_phantom_dataset

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
COMMON = dict(batch_size=1, num_samples=1, val_num_samples=1, num_val=2, epochs=1, val_interval=1, num_workers=0)
PRETRAIN = COMMON | dict(warmup_epochs=1, figure_interval=1, cache="persistent")  # ranks share one cache folder
FREPA = PRETRAIN | dict(roi_size=[32, 32, 32], encoder_size="tiny", decoder_channels=16, discriminator_hidden=16)
CASES = {
    "hiend_mae": ("hiend_mae", PRETRAIN | dict(roi_size=[32, 32, 32], decoder_hidden_size=48, decoder_num_heads=4)),
    "maesil": ("maesil", PRETRAIN | dict(superpatch_size=[32, 32, 32], encoder_layers=2, decoder_hidden_size=48,
                                         decoder_layers=1, decoder_heads=4)),
    "frepa": ("frepa", FREPA),
    "frepa-adversarial": ("frepa", FREPA | dict(embedding_loss="adversarial")),
    "seg_finetune": ("seg_finetune", COMMON | dict(roi_size=[32, 32, 32], warmup_epochs=1, sw_batch_size=1)),
}


def mask_draw(network: torch.nn.Module, roi_size) -> torch.Tensor | None:
    """A draw of the network's own training randomness (masks, corruptions), or None when it has none."""
    network.train()
    image = torch.linspace(0, 1, int(torch.tensor(roi_size).prod())).reshape(1, 1, *roi_size)
    if hasattr(network, "corruption"):  # Frepa
        return network.corruption(image)[0]
    if hasattr(network, "draw_mask"):  # MAESIL's dual mask, Hi-End-MAE's random mask
        return network.draw_mask(1, image.device).mask
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(case: str, root: Path, dataset: str) -> None:
    """One bundle case on this rank: initialize, run, record what the test checks, finalize."""
    from monai.bundle import ConfigWorkflow

    bundle, overrides = CASES[case]
    configs = BUNDLES / bundle / "configs"
    workflow = ConfigWorkflow(
        config_file=[str(configs / name) for name in ("train.json", "demo.json", "multi_gpu_train.json")],
        meta_file=str(configs / "metadata.json"),
        workflow_type="train",
        bundle_root=str(root),
        dataset_dir=dataset,
        **overrides,
    )
    workflow.initialize()
    parsed = workflow.parser.get_parsed_content
    trained = {"network": parsed("network")}
    if overrides.get("embedding_loss") == "adversarial":
        trained["discriminator"] = parsed("discriminator")
    initial = {name: {k: v.clone() for k, v in module.module.state_dict().items()} for name, module in trained.items()}
    workflow.run()
    data_key = "data" if bundle == "seg_finetune" else "datalist"
    result = {
        "initial": initial,
        "trained": {name: module.module.state_dict() for name, module in trained.items()},
        "train_shard": [item["image"] for item in parsed(f"train#dataset#{data_key}")],
        "val_shard": [item["image"] for item in parsed(f"validate#dataset#{data_key}")],
        "train_datalist": [item["image"] for item in parsed("train_datalist")],
        "val_datalist": [item["image"] for item in parsed("val_datalist")],
    }
    draw = mask_draw(trained["network"].module, parsed("superpatch_size" if bundle == "maesil" else "roi_size"))
    if draw is not None:
        result["draw"] = draw
    torch.save(result, root / f"rank{torch.distributed.get_rank()}.pt")
    workflow.finalize()


def worker(rank: int, roots: dict[str, str], dataset: str, ports: dict[str, int], world_size: int) -> None:
    """Rank ``rank`` of every case in turn, each with its own process group (as separate torchrun launches)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    for case, root in roots.items():
        os.environ["MASTER_PORT"] = str(ports[case])
        run_case(case, Path(root), dataset)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """case -> output folder of its 2-process run. One pair of processes runs every case: starting
    Python with torch and MONAI costs more than a tiny case, so each case does not pay it again."""
    tmp = tmp_path_factory.mktemp("distributed")
    dataset = write_phantom_dataset(tmp / "data", num=6, seed=0, shape=(48, 48, 48))
    roots = {case: str(tmp / case) for case in CASES}
    ports = {case: free_port() for case in CASES}
    mp.spawn(worker, args=(roots, str(dataset), ports, 2), nprocs=2, join=True)
    return {case: Path(root) for case, root in roots.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_cpu_processes_train_in_step(case, runs):
    root = runs[case]
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # Each rank built its dataset from its own part of the datalist: disjoint, together the whole split
    # (4 training scans: no padding; 2 validation scans: one each).
    for split in ("train", "val"):
        first, second = (set(rank[f"{split}_shard"]) for rank in ranks)
        assert first and second and not first & second, split
        assert first | second == set(ranks[0][f"{split}_datalist"]), split
    # Masks / corruptions come from per-rank seeds: the same draw differs between the ranks.
    if "draw" in ranks[0]:
        assert not torch.equal(ranks[0]["draw"], ranks[1]["draw"])
    # Gradients were averaged: both replicas (and Frepa's discriminator) hold identical weights, which trained.
    for name, weights in ranks[0]["trained"].items():
        for key, value in weights.items():
            assert torch.equal(value, ranks[1]["trained"][name][key]), f"{name}.{key}"
        assert any(not torch.equal(value, ranks[0]["initial"][name][key]) for key, value in weights.items()), name
    # Exactly one model, one checkpoint and one TensorBoard log, written by rank 0, without "module.".
    saved = torch.load(root / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in saved)
    assert saved.keys() == ranks[0]["trained"]["network"].keys()
    checkpoints = list((root / "models").glob("checkpoint_epoch=*.pt"))
    assert len(checkpoints) == 1
    checkpoint = torch.load(checkpoints[0], weights_only=True)
    assert not any(k.startswith("module.") for k in checkpoint["model"])
    assert len(list((root / "eval" / "tb").glob("events.out.tfevents.*"))) == 1
    # The ranks filled one persistent cache: one complete file per scan, nothing half-written left.
    if CASES[case][1].get("cache") == "persistent":
        cached = sorted((root / ".cache").iterdir())
        assert len(cached) == 6 and all(p.suffix == ".pt" and not p.name.startswith(".") for p in cached)
