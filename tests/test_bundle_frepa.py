"""The Frepa bundle runs through MONAI's ConfigWorkflow, the way the model zoo tests bundles."""

import json
import math
from pathlib import Path

import pytest
import torch
from bundle_workflow import bundle_workflow, check_metadata_against_schema, repeated_validation_metrics
from monai.bundle import ConfigWorkflow

from medssl.encoders import SEGMENTATION_PREFIX, build_segmentation_network

TINY = dict(
    num_phantoms=3,
    num_val=1,
    phantom_size=[48, 48, 48],
    epochs=2,
    val_interval=1,
    figure_interval=1,
    batch_size=1,
    num_samples=2,
    val_num_samples=1,
    eval_num_samples=2,
    num_workers=0,
    cache="none",
    roi_size=[32, 32, 32],
    decoder_channels=16,
    discriminator_hidden=16,
)


def workflow(root: Path, *extra_configs: str, **overrides) -> ConfigWorkflow:
    return bundle_workflow("frepa", root, *extra_configs, **(TINY | overrides))


def run(flow: ConfigWorkflow, component: str = "train#trainer"):
    flow.initialize()
    flow.run()
    engine = flow.parser.get_parsed_content(component) if component else None
    flow.finalize()
    return engine


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("frepa")
    flow = workflow(root)
    flow.initialize()
    flow.check_properties()
    flow.run()
    state = flow.parser.get_parsed_content("train#trainer").state
    validation = flow.parser.get_parsed_content("validate#evaluator").state
    flow.finalize()
    return root, state, validation


def test_train_writes_weights_checkpoint_figures_and_logs(trained):
    root, state, validation = trained
    assert state.epoch == 2
    assert (root / "models" / "model.pt").is_file()
    checkpoint = torch.load(next((root / "models").glob("checkpoint_epoch=2.pt")), weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "discriminator", "discriminator_optimizer", "trainer"} <= set(
        checkpoint
    )
    assert (root / "eval" / "figures" / "reconstruction_epoch0002.png").is_file()
    assert list((root / "eval" / "tb").glob("events.out.tfevents.*"))
    assert list((root / "data").rglob("dataset.json")), "the embedded phantoms were not generated"
    assert math.isfinite(validation.metrics["val_reconstruction_loss"])
    # StepLR, gamma 0.9 per epoch (demo rate 1e-3).
    assert checkpoint["lr_scheduler"]["_last_lr"][0] == pytest.approx(1e-3 * 0.9**2)


def test_model_pt_loads_into_unetr_with_every_encoder_tensor(trained):
    root = trained[0]
    weights = torch.load(root / "models" / "model.pt", weights_only=True)
    encoder = {k[len("encoder.") :]: v for k, v in weights.items() if k.startswith("encoder.")}
    assert encoder and any(k.startswith("decoder.") for k in weights)
    unetr = build_segmentation_network("vit", "tiny", out_channels=2, img_size=32)
    prefix = SEGMENTATION_PREFIX["vit"]
    renamed = {prefix + k: v for k, v in encoder.items()}
    assert set(renamed) == {k for k in unetr.state_dict() if k.startswith(prefix)}
    unetr.load_state_dict(renamed, strict=False)
    for key, value in renamed.items():
        torch.testing.assert_close(unetr.state_dict()[key], value, rtol=0, atol=0)


def test_resume_continues_from_the_last_checkpoint(trained):
    root = trained[0]
    more = workflow(root, epochs=3, val_interval=2, figure_interval=2)
    state = run(more).state
    assert state.epoch == 3
    iterations_per_epoch = len(more.parser.get_parsed_content("train#dataloader"))
    assert state.iteration == 3 * iterations_per_epoch  # the resumed run did one epoch, not three


def test_evaluate_compares_frepa_with_the_masked_image_modelling_baseline(trained):
    root = trained[0]
    run(workflow(root, "train_baseline", epochs=1, val_interval=2, figure_interval=2))
    assert (root / "models" / "baseline" / "model.pt").is_file()
    run(workflow(root, "evaluate"), component="")
    rows = json.loads((root / "eval" / "fidelity" / "fidelity.json").read_text())
    assert [(r["network"], r["corruption"]) for r in rows] == [
        ("Frepa", "image masking"),
        ("Frepa", "frequency corruption"),
        ("masked image modelling", "patch masking"),
        ("masked image modelling", "patch masking, visible pasted"),
    ]
    assert all(r["crops"] == 2 and math.isfinite(r["highpass_psnr@64"]) and r["energy_ratio@128"] > 0 for r in rows)
    # The frequency corruption removes high-band energy from the input.
    assert rows[1]["input_energy_ratio@128"] < 0.9
    table = (root / "eval" / "fidelity" / "fidelity.md").read_text()
    assert "configs/evaluate.json" in table and "| Frepa | frequency corruption | 2 |" in table


def test_adversarial_form_trains_generator_and_discriminator(tmp_path):
    trainer = run(workflow(tmp_path, epochs=1, val_interval=2, figure_interval=2, embedding_loss="adversarial"))
    output = trainer.state.output
    assert math.isfinite(float(output["discriminator_loss"])) and math.isfinite(float(output["adversarial_loss"]))
    checkpoint = torch.load(next((tmp_path / "models").glob("checkpoint_epoch=1.pt")), weights_only=True)
    steps = [float(s["step"]) for s in checkpoint["discriminator_optimizer"]["state"].values()]
    assert steps and all(s == trainer.state.iteration for s in steps), "the discriminator stepped every iteration"


def test_every_validation_sees_the_same_crops_and_masks(tmp_path):
    first, second = repeated_validation_metrics(workflow(tmp_path))
    assert first and first == second


def test_validation_corruptions_are_seeded_alike_whatever_the_run_seed(tmp_path):
    """A run with another seed validates on the same corruptions (seed 0), so validation losses compare."""
    flow = workflow(tmp_path, seed=1)
    flow.initialize()
    assert flow.parser.get_parsed_content("seed") == 1
    assert flow.parser.get_parsed_content("validate#inferer").seed == 0


def test_metadata_is_valid_against_the_official_schema():
    metadata = check_metadata_against_schema("frepa")
    assert "medssl" in metadata["required_packages_version"]


def test_training_data_cache_holds_the_deterministic_preprocessing(tmp_path):
    from monai.data import CacheDataset
    from monai.transforms import Compose

    flow = workflow(tmp_path, **(TINY | {"cache": "cache"}))
    flow.initialize()
    dataset = flow.parser.get_parsed_content("train#dataset")
    assert isinstance(dataset, CacheDataset)
    # A nested Compose would count as one random transform and CacheDataset would cache nothing.
    assert not any(isinstance(t, Compose) for t in dataset.transform.transforms)
    assert dataset._cache and dataset._cache[0]["image"].ndim == 4  # loaded, oriented, resampled scan
