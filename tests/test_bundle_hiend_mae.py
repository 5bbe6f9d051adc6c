"""The Hi-End-MAE bundle runs through MONAI's ConfigWorkflow, the way the model zoo tests bundles."""

from pathlib import Path

import pytest
import torch
from bundle_workflow import bundle_workflow, check_metadata_against_schema, repeated_validation_metrics

from medssl.encoders import SEGMENTATION_PREFIX, build_segmentation_network

TINY = dict(
    num_phantoms=4,
    num_val=1,
    phantom_size=[64, 64, 64],
    epochs=2,
    warmup_epochs=1,
    val_interval=1,
    figure_interval=1,
    batch_size=1,
    num_samples=2,
    val_num_samples=1,
    num_workers=0,
    cache="none",
    roi_size=[32, 32, 32],
    decoder_hidden_size=48,
    decoder_num_heads=4,
)


def workflow(root: Path, *extra_configs: str, **overrides):
    return bundle_workflow("hiend_mae", root, *extra_configs, **(TINY | overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("hiend_mae")
    train = workflow(root)
    train.initialize()
    train.check_properties()
    train.run()
    state = train.parser.get_parsed_content("train#trainer").state
    train.finalize()
    return root, state


def test_train_writes_weights_checkpoint_figures_and_logs(trained):
    root, state = trained
    assert state.epoch == 2
    assert (root / "models" / "model.pt").is_file()
    assert list((root / "models").glob("checkpoint_epoch=2.pt"))
    assert (root / "eval" / "figures" / "reconstruction_epoch0002.png").is_file()
    assert list((root / "eval" / "tb").glob("events.out.tfevents.*"))
    assert (root / "data" / "dataset.json").is_file(), "the embedded phantoms were not generated"
    assert "val_masked_loss" in state.metrics or state.best_metric is not None


def test_model_pt_loads_into_unetr_with_every_encoder_tensor(trained):
    root, _ = trained
    weights = torch.load(root / "models" / "model.pt", weights_only=True)
    encoder = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
    assert encoder and any(k.startswith("decoder_") for k in weights)
    unetr = build_segmentation_network("vit", "tiny", out_channels=2, img_size=32)
    vit_keys = {k for k in unetr.state_dict() if k.startswith(SEGMENTATION_PREFIX["vit"])}
    renamed = {SEGMENTATION_PREFIX["vit"] + k: v for k, v in encoder.items()}
    assert set(renamed) == vit_keys
    unetr.load_state_dict(renamed, strict=False)
    torch.testing.assert_close(unetr.state_dict()["vit.norm.weight"], encoder["norm.weight"])


def test_resume_continues_from_the_last_checkpoint(trained):
    root, _ = trained
    more = workflow(root, epochs=3)
    more.initialize()
    more.run()
    state = more.parser.get_parsed_content("train#trainer").state
    more.finalize()
    assert state.epoch == 3
    # The resumed run did one epoch of iterations, not three.
    iterations_per_epoch = len(more.parser.get_parsed_content("train#dataloader"))
    assert state.iteration == 3 * iterations_per_epoch


def test_evaluate_reports_model_and_patch_mean_errors(trained):
    root, _ = trained
    evaluate = workflow(root, "evaluate")
    evaluate.initialize()
    evaluate.run()
    metrics = evaluate.parser.get_parsed_content("validate#evaluator").state.metrics
    evaluate.finalize()
    assert set(metrics) == {"masked_loss", "patch_mean_loss"}
    assert metrics["patch_mean_loss"] == pytest.approx(1.0, abs=0.05)
    assert (root / "eval" / "reconstruction_trained" / "metrics.csv").is_file()


def test_every_validation_sees_the_same_crops_and_masks(tmp_path):
    first, second = repeated_validation_metrics(workflow(tmp_path))
    assert first and first == second


def test_metadata_is_valid_against_the_official_schema():
    metadata = check_metadata_against_schema("hiend_mae")
    assert "medssl" in metadata["required_packages_version"]
