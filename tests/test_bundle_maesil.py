"""The MAESIL bundle runs through MONAI's ConfigWorkflow (train, baselines, evaluate), tiny sizes."""

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_workflow import bundle_workflow, check_metadata_against_schema, repeated_validation_metrics
from monai.bundle import ConfigWorkflow

from medssl.encoders import build_encoder

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "maesil"
TINY = dict(
    num_phantoms=3,
    num_val=1,
    phantom_size=[40, 40, 40],  # not a multiple of the superpatch: evaluation pads and crops
    epochs=2,
    warmup_epochs=1,
    val_interval=1,
    figure_interval=1,
    batch_size=1,
    num_samples=2,
    num_workers=0,
    cache="none",
    superpatch_size=[32, 32, 32],
    encoder_layers=2,
    decoder_hidden_size=48,
    decoder_layers=1,
    decoder_heads=4,
    baseline_channels=[8, 16],
    vae_latent_size=32,
)


def workflow(root: Path, *configs: str, **overrides) -> ConfigWorkflow:
    return bundle_workflow("maesil", root, *configs, **(TINY | overrides))


def run(flow: ConfigWorkflow, check: bool = True):
    flow.initialize()
    if check:
        flow.check_properties()
    result = flow.run()
    flow.finalize()
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("maesil")
    flow = workflow(root)
    run(flow)
    state = flow.parser.get_parsed_content("train#trainer").state
    state.val_metrics = flow.parser.get_parsed_content("validate#evaluator").state.metrics
    iterations_per_epoch = len(flow.parser.get_parsed_content("train#dataloader"))
    for name in ("ae", "vae", "vqvae"):
        run(workflow(root, "baselines", baseline=name, epochs=1))
    return root, state, iterations_per_epoch


def test_train_writes_weights_checkpoint_figures_and_logs(trained):
    root, state, _ = trained
    assert state.epoch == 2
    assert (root / "models" / "model.pt").is_file()
    assert list((root / "models").glob("checkpoint_epoch=2.pt"))
    assert (root / "eval" / "figures" / "reconstruction_epoch0002.png").is_file()
    assert list((root / "eval" / "tb").glob("events.out.tfevents.*"))
    assert list((root / "data").glob("**/dataset.json")), "the embedded phantoms were not generated"
    assert np.isfinite(state.val_metrics["val_loss"])


def test_model_pt_holds_the_encoder_under_its_prefix(trained):
    root, _, _ = trained
    weights = torch.load(root / "models" / "model.pt", weights_only=True)
    encoder_state = {k[len("encoder.") :]: v for k, v in weights.items() if k.startswith("encoder.")}
    assert any(k.startswith("decoder.") for k in weights)
    encoder = build_encoder("vit", "tiny", img_size=32, patch_size=8, num_layers=2, num_heads=3)
    encoder.load_state_dict(encoder_state, strict=True)


def test_resume_continues_from_the_last_checkpoint(trained):
    root, _, iterations_per_epoch = trained
    flow = workflow(root, epochs=3)
    run(flow, check=False)
    state = flow.parser.get_parsed_content("train#trainer").state
    assert state.epoch == 3
    assert state.iteration == 3 * iterations_per_epoch  # one more epoch, not three


def test_baselines_train_into_their_own_folders(trained):
    root, _, _ = trained
    for name in ("ae", "vae", "vqvae"):
        assert (root / "models" / "baselines" / name / "model.pt").is_file()
        assert list((root / "models" / "baselines" / name).glob("checkpoint_epoch=1.pt"))


def test_baselines_see_the_same_crops_as_maesil(trained):
    root, _, _ = trained
    batches = []
    for configs, extra in (((), {}), (("baselines",), {"baseline": "vqvae"})):
        flow = workflow(root, *configs, **extra)
        flow.initialize()
        flow.parser.get_parsed_content("network")  # networks of different sizes draw from the global RNG first
        loader = flow.parser.get_parsed_content("train#dataloader")
        batches.append([batch["image"] for batch in loader])
    assert len(batches[0]) == len(batches[1]) > 1
    assert all(torch.equal(a, b) for a, b in zip(*batches))


def test_evaluate_reconstructs_whole_volumes_and_compares_methods(trained):
    root, _, _ = trained
    rows = run(workflow(root, "evaluate"), check=False)[0]
    out = root / "eval" / "reconstruction"
    methods = ["maesil", "maesil_masked", "ae", "vae", "vqvae"]
    assert [row["method"] for row in rows] == methods  # one held-out scan
    with open(out / "reconstruction_metrics.csv") as stream:
        table = list(csv.DictReader(stream))
    assert [row["method"] for row in table if row["scan"] == "mean"] == methods
    assert all(np.isfinite(float(row["psnr_db"])) and -1 <= float(row["ssim"]) <= 1 for row in table)
    markdown = (out / "reconstruction_metrics.md").read_text()
    assert "| maesil_masked | yes" in markdown and "| ae | no" in markdown and "LPIPS" in markdown

    # outputs are on the scan's own grid, and the metrics are those of the written volumes
    scan = rows[0]["scan"]
    source = nib.load(next((root / "data").glob(f"**/imagesTr/{scan}.nii.gz")))
    original = nib.load(out / "reconstructions" / f"{scan}_input.nii.gz")
    reconstruction = nib.load(out / "reconstructions" / f"{scan}_maesil.nii.gz")
    assert reconstruction.shape == source.shape == (40, 40, 40)
    np.testing.assert_allclose(reconstruction.affine, source.affine, atol=1e-5)
    windowed = np.clip((source.get_fdata() + 175) / 425, 0, 1)
    np.testing.assert_allclose(original.get_fdata(), windowed, atol=1e-5)
    mse = np.mean((reconstruction.get_fdata() - windowed) ** 2)
    assert 10 * np.log10(1 / mse) == pytest.approx(rows[0]["psnr_db"], abs=1e-3)
    assert (out / "figures" / f"{scan}.png").is_file()


def test_evaluate_names_the_training_command_when_a_baseline_is_missing(trained, tmp_path):
    root, _, _ = trained
    flow = workflow(root, "evaluate", baselines=["ae"], baseline_ckpt_root=str(tmp_path), masked_evaluation=[])
    flow.initialize()
    with pytest.raises(Exception) as raised:
        flow.run()
    error = raised.value
    while error is not None and not isinstance(error, FileNotFoundError):
        error = error.__cause__
    assert error is not None, f"no FileNotFoundError behind {raised.value!r}"
    assert "models/baselines" not in str(tmp_path) and str(tmp_path) in str(error)
    assert "configs/baselines.json" in str(error) and "--baseline NAME" in str(error)


def test_every_validation_sees_the_same_crops_and_masks(tmp_path):
    first, second = repeated_validation_metrics(workflow(tmp_path))
    assert first and first == second


def test_metadata_is_valid_against_the_official_schema():
    metadata = check_metadata_against_schema("maesil")
    assert "medssl" in metadata["required_packages_version"]
