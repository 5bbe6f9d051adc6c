"""Engine pieces: schedule, clipping, non-finite loss stop, evaluation means, figures, best model and AMP resume."""

import json
import logging
import math
import os
import socket

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader as MonaiDataLoader, Dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.transforms import RandSpatialCropSamplesd
from torch.utils.data import DataLoader

from medssl.engine import (
    BestModelCheckpoint,
    CPUAutocastInferer,
    GradientClipping,
    MeanOutput,
    ResumableCheckpoint,
    RNGState,
    SeededInferer,
    SeededValidationData,
    StopOnNonFiniteLoss,
    WarmupCosineSchedule,
    network_loss,
)
from medssl.figures import orthogonal_views


class LossNet(torch.nn.Module):
    """A network that computes its own loss, with a switch to make it NaN at a chosen call."""

    def __init__(self, nan_at_call: int | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([2.0, -3.0]))
        self.calls = 0
        self.nan_at_call = nan_at_call

    def forward(self, image: torch.Tensor) -> dict:
        self.calls += 1
        loss = (self.weight * image.mean()).pow(2).sum() * 100
        if self.calls == self.nan_at_call:
            loss = loss * float("nan")
        return {"loss": loss, "per_sample": image.flatten(1).mean(1)}

    def noisy_double(self, image: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        return {"value": 2 * image.flatten(1).mean(1) + torch.rand(image.shape[0], generator=generator)}


def loader(n: int = 4) -> DataLoader:
    return DataLoader([{"image": torch.full((1, 2, 2), float(i + 1))} for i in range(n)], batch_size=2)


def trainer(network, handlers=(), epochs: int = 1, lr: float = 0.1) -> SupervisedTrainer:
    optimizer = torch.optim.SGD(network.parameters(), lr=lr)
    return SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=epochs, train_data_loader=loader(), network=network,
        optimizer=optimizer, loss_function=network_loss, decollate=False, train_handlers=list(handlers),
    )


def test_warmup_cosine_schedule_values():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosineSchedule(optimizer, warmup_steps=4, total_steps=12, min_lr_ratio=0.1)
    rates = []
    for _ in range(13):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert rates[12] == pytest.approx(0.1)


def test_gradient_clipping_bounds_the_update():
    network = LossNet()
    engine = trainer(network, lr=1.0)
    GradientClipping(max_norm=0.5).attach(engine)
    before = network.weight.detach().clone()
    engine.run()
    steps = 2
    assert (network.weight.detach() - before).norm() <= 0.5 * steps + 1e-5
    unclipped = LossNet()
    trainer(unclipped, lr=1.0).run()
    assert (unclipped.weight.detach() - before).norm() > 10


def test_nan_loss_stops_with_the_iteration_and_keeps_good_weights(tmp_path):
    network = LossNet(nan_at_call=3)  # epoch 2, iteration 3
    engine = trainer(network, epochs=3, lr=1e-4)
    StopOnNonFiniteLoss().attach(engine)
    ResumableCheckpoint(tmp_path, {"model": network}).attach(engine)
    with pytest.raises(FloatingPointError, match="at iteration 3 \\(epoch 2\\)"):
        engine.run()
    assert torch.isfinite(network.weight).all()
    assert [p.name for p in tmp_path.glob("*.pt")] == ["checkpoint_epoch=1.pt"]
    saved = torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)
    assert torch.isfinite(saved["model"]["weight"]).all()


def test_mean_output_averages_per_sample_and_scalar_entries():
    network = LossNet()
    per_sample = MeanOutput("per_sample")
    scalar = MeanOutput("loss")
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=loader(), network=network, decollate=False,
        key_val_metric={"per_sample": per_sample}, additional_metrics={"loss": scalar},
    )
    evaluator.run()
    assert evaluator.state.metrics["per_sample"] == pytest.approx(2.5)
    # Batches of images 1, 2 and 3, 4: loss = 100 * (4 + 9) * mean(image)^2, averaged by batch size.
    assert evaluator.state.metrics["loss"] == pytest.approx(1300 * (1.5**2 + 3.5**2) / 2, rel=1e-6)


def test_seeded_inferer_calls_the_named_method_with_the_same_draws_every_batch():
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=loader(), network=LossNet(), decollate=False,
        inferer=SeededInferer(seed=3, method="noisy_double"), key_val_metric={"value": MeanOutput("value")},
    )
    evaluator.run()
    # Both batches of two draw the same two numbers; the doubled image means average to 5.
    noise = torch.rand(2, generator=torch.Generator().manual_seed(3)).mean().item()
    assert evaluator.state.metrics["value"] == pytest.approx(5.0 + noise)


class PrecisionProbe(torch.nn.Module):
    """A pointwise convolution (so sliding windows agree with the whole image) that records its output dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)
        self.seen: list[torch.dtype] = []

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        output = self.conv(image)
        self.seen.append(output.dtype)
        return output


@pytest.mark.parametrize("enabled", [True, False])
def test_cpu_autocast_inferer_runs_the_network_in_bfloat16_and_returns_float32(enabled):
    image = torch.rand(2, 1, 12, 12, 12, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    network = PrecisionProbe()
    expected = network(image)
    network.seen.clear()
    # Sliding windows: four windows of each image, blended in the inferer's float32 buffer.
    inferer = CPUAutocastInferer(SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=2, overlap=0.5),
                                 enabled=enabled)
    output = inferer(image, network)
    assert output.dtype == torch.float32
    assert set(network.seen) == {torch.bfloat16 if enabled else torch.float32}
    error = (output - expected).abs().max().item()
    assert (0 < error < 0.02) if enabled else (error < 1e-5)
    # Training: gradients reach the float32 weights through the bfloat16 convolution.
    network.seen.clear()
    loss = CPUAutocastInferer(SimpleInferer(), enabled=enabled)(image, network).square().mean()
    loss.backward()
    assert loss.dtype == torch.float32 and network.conv.weight.grad.dtype == torch.float32
    assert network.conv.weight.grad.abs().sum() > 0


def test_cpu_autocast_inferer_warns_on_a_cpu_without_native_bfloat16(monkeypatch, caplog):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level(logging.WARNING):
        CPUAutocastInferer(SimpleInferer(), enabled=False)
        assert caplog.text == ""
        CPUAutocastInferer(SimpleInferer(), enabled=True)
    assert "without native bfloat16" in caplog.text and "set amp to false" in caplog.text


class CropSum(torch.nn.Module):
    """Reports the sum of each crop it sees, which tells crops apart."""

    def forward(self, image: torch.Tensor) -> dict:
        return {"loss": image.sum(), "crop_sum": image.flatten(1).sum(1)}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_seeded_validation_data_validates_the_same_crops_every_run(num_workers):
    scans = [{"image": torch.arange(4096.0).reshape(1, 16, 16, 16) * (i + 1)} for i in range(3)]
    crops = RandSpatialCropSamplesd("image", roi_size=(4, 4, 4), num_samples=2, random_size=False)

    def crop_sums(handlers) -> list[list[float]]:
        seen = []
        evaluator = SupervisedEvaluator(
            device=torch.device("cpu"), network=CropSum(), decollate=False, val_handlers=handlers,
            val_data_loader=MonaiDataLoader(Dataset(scans, crops), batch_size=1, num_workers=num_workers),
        )
        evaluator.add_event_handler(
            Events.ITERATION_COMPLETED, lambda engine: seen.append(engine.state.output["pred"]["crop_sum"].tolist())
        )
        for _ in range(2):
            evaluator.run()
        return [seen[: len(scans)], seen[len(scans):]]

    first_run, second_run = crop_sums([SeededValidationData(seed=3)])
    assert first_run == second_run
    unseeded_first, unseeded_second = crop_sums([])
    assert unseeded_first != unseeded_second  # without it, the second validation draws other crops


def test_orthogonal_views_writes_a_png(tmp_path):
    volume = torch.rand(1, 16, 12, 8)
    labels = (volume > 0.5).long()
    path = orthogonal_views({"input": volume, "label": volume}, tmp_path / "views.png", title="t",
                            overlays={"label": labels})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class EpochScores(torch.utils.data.Dataset):
    """One validation image whose value, the evaluator's key metric, is ``scores[evaluator epoch]``."""

    def __init__(self, scores: dict[int, float]) -> None:
        self.scores = scores
        self.evaluator: SupervisedEvaluator | None = None

    def __len__(self) -> int:
        return 1

    def __getitem__(self, _index: int) -> dict:
        return {"image": torch.full((1, 2, 2), self.scores[self.evaluator.state.epoch])}


def validated_run(ckpt_dir, scores: dict[int, float], epochs: int) -> tuple[SupervisedTrainer, SupervisedEvaluator]:
    """A trainer validated every epoch on ``scores``, its best model in ckpt_dir/model.pt, resumable."""
    torch.manual_seed(0)
    network = LossNet()
    dataset = EpochScores(scores)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(dataset, batch_size=1), network=network,
        decollate=False, key_val_metric={"score": MeanOutput("per_sample")},
        val_handlers=[BestModelCheckpoint(ckpt_dir, {"model": network})],
    )
    dataset.evaluator = evaluator
    engine = trainer(network, epochs=epochs, lr=1e-3)
    ValidationHandler(interval=1, validator=evaluator).attach(engine)
    ResumableCheckpoint(ckpt_dir, {"model": network, "optimizer": engine.optimizer}, evaluator=evaluator).attach(engine)
    return engine, evaluator


def test_resume_restores_the_best_metric_and_a_worse_epoch_keeps_the_best_model(tmp_path):
    first, _ = validated_run(tmp_path, {1: 0.8}, epochs=1)
    first.run()
    best_weights = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.equal(best_weights["weight"], first.network.weight)
    assert torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)["evaluator"] == {
        "best_metric": pytest.approx(0.8), "best_metric_epoch": 1}

    # A new process: epoch 2 validates worse than the restored best, epoch 3 better.
    resumed, evaluator = validated_run(tmp_path, {2: 0.5, 3: 0.9}, epochs=3)
    assert evaluator.state.best_metric == pytest.approx(0.8) and evaluator.state.best_metric_epoch == 1
    best_after_epoch = {}
    resumed.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda e: best_after_epoch.update({e.state.epoch: torch.load(tmp_path / "model.pt", weights_only=True)}),
    )
    resumed.run()
    assert torch.equal(best_after_epoch[2]["weight"], best_weights["weight"]), "a worse epoch replaced the best model"
    assert not torch.equal(best_after_epoch[2]["weight"], LossNet().weight)  # it did train on in epoch 2
    assert torch.equal(best_after_epoch[3]["weight"], resumed.network.weight), "a better epoch was not saved"
    assert evaluator.state.best_metric == pytest.approx(0.9) and evaluator.state.best_metric_epoch == 3


def test_best_model_checkpoint_needs_a_key_metric(tmp_path):
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader(), network=LossNet())
    with pytest.raises(ValueError, match="key_val_metric"):
        BestModelCheckpoint(tmp_path, {"model": evaluator.network}).attach(evaluator)


def test_amp_scaler_state_is_checkpointed_and_resumed(tmp_path, monkeypatch):
    # On CPU MONAI's torch.cuda.amp.GradScaler() is disabled (it has no state to keep), so give the
    # trainer an enabled CPU scaler whose scale doubles after every step.
    monkeypatch.setattr(torch.cuda.amp, "GradScaler", lambda: torch.amp.GradScaler("cpu", init_scale=4.0,
                                                                                  growth_interval=1))

    def amp_run(ckpt_dir, epochs: int) -> SupervisedTrainer:
        torch.manual_seed(0)
        network = LossNet()
        engine = SupervisedTrainer(
            device=torch.device("cpu"), max_epochs=epochs, train_data_loader=loader(), network=network,
            optimizer=torch.optim.SGD(network.parameters(), lr=1e-3), loss_function=network_loss, decollate=False,
            amp=True,
        )
        ResumableCheckpoint(ckpt_dir, {"model": network}).attach(engine)
        return engine

    amp_run(tmp_path / "resumed", epochs=1).run()
    saved = torch.load(tmp_path / "resumed" / "checkpoint_epoch=1.pt", weights_only=True)
    assert saved["scaler"]["scale"] == 4.0 * 2**2  # two steps in epoch 1
    resumed = amp_run(tmp_path / "resumed", epochs=2)
    resumed.run()
    uninterrupted = amp_run(tmp_path / "uninterrupted", epochs=2)
    uninterrupted.run()
    assert resumed.scaler.get_scale() == uninterrupted.scaler.get_scale() == 4.0 * 2**4
    assert torch.equal(resumed.network.weight, uninterrupted.network.weight)
    assert torch.load(tmp_path / "resumed" / "checkpoint_epoch=2.pt", weights_only=True)["scaler"]["scale"] == 64.0


def test_disabled_amp_scaler_is_left_out_and_resume_works(tmp_path):
    network = LossNet()
    engine = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=loader(), network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=1e-3), loss_function=network_loss, decollate=False,
        amp=True,  # without CUDA the scaler MONAI creates is disabled: a state_dict of {} that cannot be loaded
    )
    ResumableCheckpoint(tmp_path, {"model": network}).attach(engine)
    engine.run()
    assert engine.scaler is not None and not engine.scaler.is_enabled()
    assert "scaler" not in torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)


def test_a_checkpoint_of_another_config_is_refused_with_its_path(tmp_path):
    network = LossNet()
    engine = trainer(network)
    ResumableCheckpoint(tmp_path, {"model": network}).attach(engine)
    engine.run()
    other = torch.nn.Linear(3, 1)  # another network: its weights do not fit the saved ones
    refusal = r"(?s)checkpoint_epoch=1\.pt does not fit this run .*size mismatch.*move it out of"
    with pytest.raises(ValueError, match=refusal):
        ResumableCheckpoint(tmp_path, {"model": other}).attach(trainer(other))


def test_running_a_finished_run_again_trains_nothing(tmp_path):
    network = LossNet()
    trainer_once = trainer(network, epochs=2)
    ResumableCheckpoint(tmp_path, {"model": network}).attach(trainer_once)
    trainer_once.run()
    finished = network.weight.detach().clone()

    again = LossNet()
    engine = trainer(again, epochs=2)
    ResumableCheckpoint(tmp_path, {"model": again}).attach(engine)
    engine.run()
    assert again.calls == 0  # not a single training step
    torch.testing.assert_close(again.weight.detach(), finished)

    more = LossNet()
    engine = trainer(more, epochs=3)  # a larger budget trains on from epoch 2
    ResumableCheckpoint(tmp_path, {"model": more}).attach(engine)
    engine.run()
    assert more.calls == 2 and engine.state.epoch == 3


def rng_worker(rank: int, folder: str, port: int) -> None:
    """Rank ``rank`` of 2 (gloo): save the random state, draw, then draw again after loading it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)  # each process its own stream, as the multi-GPU configs seed with seed + rank
    state = RNGState().state_dict()
    if rank == 0:
        torch.save(state, f"{folder}/rng.pt")
    expected = torch.rand(4)
    torch.distributed.barrier()
    torch.manual_seed(123)
    RNGState().load_state_dict(torch.load(f"{folder}/rng.pt", weights_only=True))
    torch.save({"expected": expected, "resumed": torch.rand(4)}, f"{folder}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_each_process_of_a_distributed_run_resumes_its_own_random_stream(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(rng_worker, args=(str(tmp_path), port), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert len(torch.load(tmp_path / "rng.pt", weights_only=True)["ranks"]) == 2
    for rank in ranks:
        assert torch.equal(rank["resumed"], rank["expected"])
    assert not torch.equal(ranks[0]["resumed"], ranks[1]["resumed"])


def test_a_checkpoint_of_other_settings_is_refused_naming_them(tmp_path):
    def run(settings: dict, epochs: int = 1) -> SupervisedTrainer:
        network = LossNet()
        engine = trainer(network, epochs=epochs)
        ResumableCheckpoint(tmp_path, {"model": network}, settings=settings).attach(engine)
        engine.run()
        return engine

    run({"learning_rate": 0.1, "label_count": 2})
    saved = torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)
    assert json.loads(saved["settings"]["json"]) == {"learning_rate": 0.1, "label_count": 2}
    refusal = r"checkpoint_epoch=1\.pt was written with other settings \(label_count: 2 -> 1\).*another ckpt_dir"
    with pytest.raises(ValueError, match=refusal):
        run({"learning_rate": 0.1, "label_count": 1}, epochs=2)
    assert run({"learning_rate": 0.1, "label_count": 2}, epochs=2).state.epoch == 2  # same settings resume


def test_a_checkpoint_without_settings_resumes_with_a_warning(tmp_path, caplog):
    network = LossNet()
    engine = trainer(network)
    ResumableCheckpoint(tmp_path, {"model": network}).attach(engine)
    engine.run()
    checkpoint = tmp_path / "checkpoint_epoch=1.pt"
    saved = torch.load(checkpoint, weights_only=True)
    del saved["settings"]  # as written before settings were recorded
    torch.save(saved, checkpoint)
    more = LossNet()
    engine = trainer(more, epochs=2)
    with caplog.at_level(logging.WARNING, logger="medssl.engine"):
        ResumableCheckpoint(tmp_path, {"model": more}, settings={"seed": 0}).attach(engine)
    assert "records no settings" in caplog.text
    engine.run()
    assert more.calls == 2 and engine.state.epoch == 2


def test_a_checkpoint_of_another_epoch_length_is_refused(tmp_path):
    network = LossNet()
    engine = trainer(network)  # 2 iterations per epoch
    ResumableCheckpoint(tmp_path, {"model": network}).attach(engine)
    engine.run()
    other = LossNet()
    longer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=2, train_data_loader=loader(8), network=other,
        optimizer=torch.optim.SGD(other.parameters(), lr=0.1), loss_function=network_loss, decollate=False,
    )
    refusal = r"checkpoint_epoch=1\.pt was written by a run of 2 iterations per epoch, this run has 4"
    with pytest.raises(ValueError, match=refusal):
        ResumableCheckpoint(tmp_path, {"model": other}).attach(longer)
