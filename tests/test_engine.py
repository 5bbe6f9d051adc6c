"""Engine pieces: schedule, clipping, non-finite loss stop, evaluation means, figures."""

import math

import pytest
import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from torch.utils.data import DataLoader

from medssl.engine import (
    GradientClipping,
    MeanOutput,
    MethodInferer,
    ResumableCheckpoint,
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

    def doubled(self, image: torch.Tensor) -> dict:
        return {"value": 2 * image.flatten(1).mean(1)}


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


def test_method_inferer_calls_the_named_method():
    network = LossNet()
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=loader(), network=network, decollate=False,
        inferer=MethodInferer("doubled"), key_val_metric={"value": MeanOutput("value")},
    )
    evaluator.run()
    assert evaluator.state.metrics["value"] == pytest.approx(5.0)


def test_orthogonal_views_writes_a_png(tmp_path):
    volume = torch.rand(1, 16, 12, 8)
    labels = (volume > 0.5).long()
    path = orthogonal_views({"input": volume, "label": volume}, tmp_path / "views.png", title="t",
                            overlays={"label": labels})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
