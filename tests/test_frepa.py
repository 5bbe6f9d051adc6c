"""Frepa's network (medssl.models.frepa): corruption selection, embedding terms, encoders, GAN iteration."""

import math

import numpy as np
import pytest
import torch
from monai.engines import SupervisedTrainer

from medssl.data import generate_phantom
from medssl.encoders import SEGMENTATION_PREFIX, build_segmentation_network
from medssl.engine import network_loss
from medssl.frequency import (
    frequency_corruption,
    highpass_filter,
    histogram_equalised_mask,
    low_frequency_perturbation,
    spectral_patch_mask,
)
from medssl.engine import SeededInferer
from medssl.models.frepa import (
    AdversarialIteration,
    FrepaCorruption,
    FrepaDiscriminator,
    FrepaNetwork,
    MaskedImageModelling,
    consistency_loss,
    discriminator_loss,
    generator_adversarial_loss,
    log_spectrum,
    loss_terms,
    restoration_fidelity,
)

SIZE = 32


def phantom_batch(batch: int = 2, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """(B, 1, size^3) crops of a synthetic CT, HU window [-175, 250] scaled to [0, 1]."""
    crops = []
    for i in range(batch):
        hu, _, _ = generate_phantom((size, size, size), (3.0, 3.0, 3.0), seed=seed + i)
        crops.append(np.clip((hu.astype(np.float32) + 175.0) / 425.0, 0.0, 1.0))
    return torch.from_numpy(np.stack(crops))[:, None]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return phantom_batch()


def tiny_network(kind: str = "vit", **kwargs) -> FrepaNetwork:
    kwargs.setdefault("decoder_channels", 16)
    return FrepaNetwork(kind, "tiny", img_size=SIZE, **kwargs)


# --- corruption selection -------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_corruption_picks_per_sample_between_the_two_ops(dims):
    torch.manual_seed(1)
    x = torch.rand(8, 1, *[SIZE] * dims)
    corruption = FrepaCorruption(spatial_dims=dims)
    corrupted, used_image_mask = corruption(x, torch.Generator().manual_seed(3))

    # Reference: the same draws, in the documented order; each op sees only its own samples.
    generator = torch.Generator().manual_seed(3)
    order = torch.randperm(8, generator=generator)
    image_rows, frequency_rows = order[:4], order[4:]
    image_masked, _ = histogram_equalised_mask(x[image_rows], SIZE // 16, (0.5, 0.75), generator=generator)
    frequency_corrupted, _ = frequency_corruption(x[frequency_rows], SIZE // 32, generator=generator)
    assert torch.equal(used_image_mask, torch.isin(torch.arange(8), image_rows))
    torch.testing.assert_close(corrupted[image_rows], image_masked, rtol=0, atol=0)
    torch.testing.assert_close(corrupted[frequency_rows], frequency_corrupted, rtol=0, atol=0)


def test_corruption_leftover_sample_when_the_expected_count_is_fractional():
    """B = 3, p = 0.5: one image-masked sample, one frequency-corrupted, one decided by a coin."""
    x = torch.rand(3, 1, 32, 32)
    corruption = FrepaCorruption(spatial_dims=2)
    corrupted, used_image_mask = corruption(x, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(3, generator=generator)
    leftover = bool(torch.rand(1, generator=generator) < 0.5)
    image_masked, _ = histogram_equalised_mask(x[order[:2]], 2, generator=generator)
    frequency_corrupted, _ = frequency_corruption(x[order[1:]], 1, generator=generator)
    expected = [image_masked[0], image_masked[1] if leftover else frequency_corrupted[0], frequency_corrupted[1]]
    for position, row in enumerate(order.tolist()):
        torch.testing.assert_close(corrupted[row], expected[position], rtol=0, atol=0)
    assert used_image_mask[order].tolist() == [True, leftover, False]

    # Over many draws every sample is image-masked with probability p, 1 or 2 per batch.
    choices = torch.stack([corruption(x, torch.Generator().manual_seed(seed))[1] for seed in range(1, 401)])
    assert set(choices.sum(1).tolist()) == {1, 2}
    assert torch.all((choices.float().mean(0) - 0.5).abs() < 0.1)  # 4 sigma of 400 draws: 0.1


@pytest.mark.parametrize("probability, expect_image", [(0.0, False), (1.0, True)])
def test_corruption_probability_extremes(images, probability, expect_image):
    corrupted, used_image_mask = FrepaCorruption(image_mask_probability=probability)(
        images, torch.Generator().manual_seed(0)
    )
    assert bool(used_image_mask.all()) == expect_image and bool(used_image_mask.any()) == expect_image
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(images.shape[0], generator=generator)
    if expect_image:
        expected, _ = histogram_equalised_mask(images[order], 2, generator=generator)
    else:
        expected, _ = frequency_corruption(images[order], 1, generator=generator)
    torch.testing.assert_close(corrupted[order], expected, rtol=0, atol=0)


def test_corruption_patch_sizes_follow_the_grids():
    x = torch.rand(2, 1, 64, 64, 64)
    corruption = FrepaCorruption(image_mask_grid=8, spectral_mask_grid=16, image_mask_probability=1.0)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(2, generator=generator)
    expected, replaced = histogram_equalised_mask(x[order], 8, generator=generator)
    assert replaced.shape == (2, 8, 8, 8)
    torch.testing.assert_close(corruption(x, torch.Generator().manual_seed(0))[0][order], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="spectral_mask_grid"):
        FrepaCorruption(spectral_mask_grid=32).frequency(torch.rand(1, 1, 48, 48, 48))


def test_views_are_spectral_masking_and_low_frequency_perturbation(images):
    masked, perturbed = FrepaCorruption().views(images, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    expected_masked, _ = spectral_patch_mask(images, 1, generator=generator)
    expected_perturbed = low_frequency_perturbation(images, generator=generator)
    torch.testing.assert_close(masked, expected_masked, rtol=0, atol=0)
    torch.testing.assert_close(perturbed, expected_perturbed, rtol=0, atol=0)
    # The perturbed view keeps the clean scan's fine detail, the masked one has it destroyed.
    detail_error = [float((highpass_filter(v - images, 128.0)).abs().mean()) for v in (masked, perturbed)]
    assert detail_error[1] < 0.2 * detail_error[0], detail_error


# --- embedding terms, hand-computed -------------------------------------------------------------


def test_consistency_loss_value_and_symmetric_stop_gradient():
    first = torch.tensor([[0.0, 0.0]], requires_grad=True)
    second = torch.tensor([[1.0, 3.0]], requires_grad=True)
    loss = consistency_loss(first, second)
    assert float(loss) == pytest.approx(5.0)  # mean of 1 and 9
    loss.backward()
    # Each side gets half of the plain MSE gradient, pulled towards the other (frozen) side.
    torch.testing.assert_close(first.grad, torch.tensor([[-0.5, -1.5]]))
    torch.testing.assert_close(second.grad, torch.tensor([[0.5, 1.5]]))


class FirstFeature(torch.nn.Module):
    """A 'discriminator' whose logit is the first feature."""

    def forward(self, x):
        return x[:, 0]


def test_adversarial_losses_hand_values():
    real = torch.tensor([[0.0, 7.0]])
    fake = torch.tensor([[math.log(3.0), -2.0]])  # sigmoid = 0.75
    # D: mean of -log(sigmoid(0)) = log 2 and -log(1 - 0.75) = log 4.
    assert float(discriminator_loss(FirstFeature(), real, fake)) == pytest.approx(1.5 * math.log(2.0))
    # G (non-saturating): -log(0.75).
    assert float(generator_adversarial_loss(FirstFeature(), fake)) == pytest.approx(math.log(4.0 / 3.0))


def test_embeddings_are_standardised_pooled_features(images):
    network = tiny_network("cnn")
    embedding = network.embed(images)
    assert embedding.shape == (2, network.embedding_channels)
    torch.testing.assert_close(embedding.mean(1), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(embedding.var(1, correction=0), torch.ones(2), atol=1e-3, rtol=0)


# --- network ----------------------------------------------------------------------------------


# The embedding term runs through each encoder's pooled features in other tests; here Swin and
# CNN skip it to keep the file fast.
@pytest.mark.parametrize("kind, embedding_loss", [("vit", "consistency"), ("swin", "none"), ("cnn", "none")])
def test_each_encoder_trains_and_its_weights_load_downstream(images, kind, embedding_loss):
    torch.manual_seed(0)
    network = tiny_network(kind, embedding_loss=embedding_loss)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        output = network(images[:1], torch.Generator().manual_seed(0))  # the same corruption each step
        optimizer.zero_grad()
        output["loss"].backward()
        optimizer.step()
        losses.append(float(output["loss"]))
    assert output["restored"].shape == images[:1].shape
    assert losses[-1] < losses[0], losses
    weights = network.state_dict()
    encoder = {k[len("encoder.") :]: v for k, v in weights.items() if k.startswith("encoder.")}
    assert any(not torch.equal(before["encoder." + k], v) for k, v in encoder.items()), "encoder did not train"

    segmentation = build_segmentation_network(kind, "tiny", out_channels=3, img_size=SIZE)
    prefix = SEGMENTATION_PREFIX[kind]
    target = {k for k in segmentation.state_dict() if k.startswith(prefix)}
    if kind == "cnn":  # SegResNet's encoder is its convInit + down_layers
        target = {k for k in target if k.startswith(("convInit.", "down_layers."))}
    renamed = {prefix + k: v for k, v in encoder.items()}
    assert set(renamed) == target, "every encoder tensor has a place downstream and vice versa"
    segmentation.load_state_dict(renamed, strict=False)
    loaded = segmentation.state_dict()
    for key, value in renamed.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def upsamplings(network: FrepaNetwork) -> int:
    return sum(isinstance(m, torch.nn.Upsample) for m in network.decoder)


def test_network_in_2d_and_with_chosen_feature_maps():
    network = FrepaNetwork("vit", "tiny", img_size=64, spatial_dims=2, decoder_channels=16)
    output = network(torch.rand(3, 1, 64, 64))
    assert output["restored"].shape == (3, 1, 64, 64) and output["loss"].ndim == 0
    assert float(output["embedding_loss"]) >= 0
    assert upsamplings(network) == 4  # patch 16
    swin = FrepaNetwork("swin", "tiny", img_size=SIZE, feature_index=2, decoder_channels=16)
    assert upsamplings(swin) == 3 and swin.embedding_channels == 48  # stage 2: stride 8, 12 * 4 channels
    cnn = FrepaNetwork("cnn", "tiny", img_size=SIZE, feature_index=1, decoder_channels=16, embedding_loss="none")
    assert upsamplings(cnn) == 1 and cnn.embedding_channels == 16
    assert cnn(torch.rand(1, 1, SIZE, SIZE, SIZE))["restored"].shape == (1, 1, SIZE, SIZE, SIZE)


def test_network_rejects_unknown_embedding_loss():
    with pytest.raises(ValueError, match="embedding_loss"):
        tiny_network(embedding_loss="contrastive")


def test_figure_panels_and_spectra(images):
    panels = tiny_network().figure_panels(images[:1], torch.Generator().manual_seed(0))
    assert list(panels)[:3] == ["clean", "image-masked", "restored (image)"]
    assert all(p.shape == (1, 1, SIZE, SIZE, SIZE) for p in panels.values())
    assert float(panels["|F| clean"].max()) == pytest.approx(1.0)
    # Log-magnitude spectra on the clean scan's scale, DC at the centre.
    spectrum = log_spectrum(images[:1])
    assert float(spectrum[0, 0, SIZE // 2, SIZE // 2, SIZE // 2]) == pytest.approx(1.0)


def test_seeded_inferer_repeats_the_same_corruption(images):
    network = tiny_network(embedding_loss="none").eval()
    inferer = SeededInferer(seed=4)
    with torch.no_grad():
        first, second = inferer(images, network), inferer(images, network)
    torch.testing.assert_close(first["corrupted"], second["corrupted"], rtol=0, atol=0)
    torch.testing.assert_close(first["loss"], second["loss"], rtol=0, atol=0)


# --- adversarial iteration --------------------------------------------------------------------


def adversarial_step(images: torch.Tensor, weight: float):
    torch.manual_seed(0)
    network = tiny_network(embedding_loss="adversarial", encoder_args={"num_layers": 2})
    discriminator = FrepaDiscriminator(network.embedding_channels, 32)
    before = (
        {k: v.clone() for k, v in network.state_dict().items()},
        {k: v.clone() for k, v in discriminator.state_dict().items()},
    )
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[{"image": images}],
        network=network,
        optimizer=torch.optim.AdamW(network.parameters(), lr=1e-3),
        loss_function=network_loss,
        iteration_update=AdversarialIteration(
            discriminator, torch.optim.AdamW(discriminator.parameters(), lr=1e-3), weight=weight
        ),
        decollate=False,
    )
    trainer.run()
    return trainer.state.output, before, network, discriminator


def test_adversarial_iteration_updates_both_networks_and_logs_both_losses(images):
    output, (network_before, disc_before), network, discriminator = adversarial_step(images, weight=1.0)
    assert any(
        not torch.equal(network_before[k], v) for k, v in network.state_dict().items() if k.startswith("encoder.")
    )
    assert all(not torch.equal(disc_before[k], v) for k, v in discriminator.state_dict().items())
    terms = loss_terms(output)
    assert {"loss", "reconstruction_loss", "discriminator_loss", "adversarial_loss"} <= set(terms)
    assert all(torch.isfinite(v) for v in terms.values())
    expected = output["pred"]["loss"] + 1.0 * output["adversarial_loss"]
    torch.testing.assert_close(output["loss"].detach(), expected.detach())


def test_adversarial_gradient_reaches_the_encoder_but_not_the_discriminator(images):
    with_adversary = adversarial_step(images, weight=1.0)
    without = adversarial_step(images, weight=0.0)
    # The discriminator's update happens on detached embeddings, before the generator's step.
    for key, value in with_adversary[3].state_dict().items():
        torch.testing.assert_close(value, without[3].state_dict()[key], rtol=0, atol=0)
    # The encoder's update depends on the adversarial term.
    changed = [
        not torch.allclose(value, without[2].state_dict()[key])
        for key, value in with_adversary[2].state_dict().items()
        if key.startswith("encoder.")
    ]
    assert any(changed)


def test_adversarial_iteration_needs_the_adversarial_form(images):
    network = tiny_network(embedding_loss="consistency", encoder_args={"num_layers": 2})
    discriminator = FrepaDiscriminator(network.embedding_channels, 8)
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[{"image": images}],
        network=network,
        optimizer=torch.optim.AdamW(network.parameters()),
        loss_function=network_loss,
        iteration_update=AdversarialIteration(discriminator, torch.optim.AdamW(discriminator.parameters())),
        decollate=False,
    )
    with pytest.raises(ValueError, match="embedding_loss"):
        trainer.run()


# --- baseline and evaluation ------------------------------------------------------------------


def test_masked_image_modelling_baseline(images):
    torch.manual_seed(0)
    baseline = MaskedImageModelling("cnn", "tiny", img_size=SIZE, mask_ratio=0.75, mask_patch_size=16)
    mask = baseline.mask(images, torch.Generator().manual_seed(0))  # on the stride-8 grid: 4^3 tokens
    assert mask.shape == (2, 64) and torch.equal(mask.sum(1), torch.full((2,), 48.0))
    results = baseline.corrupt_and_restore(images, torch.Generator().manual_seed(0))
    corrupted, raw = results["patch masking"]
    _, pasted = results["patch masking, visible pasted"]
    visible = (corrupted != 0).float()  # every masked block is zero, visible tissue is not
    assert float(visible.mean()) < 0.3
    torch.testing.assert_close(pasted * visible, images * visible)
    assert not torch.equal(raw * visible, images * visible)
    output = baseline(images)
    output["loss"].backward()
    assert baseline.head.weight.grad is not None


class Smoother(torch.nn.Module):
    """Restores a scan perfectly (blur=False) or as a box-blurred copy."""

    def __init__(self, blur: bool) -> None:
        super().__init__()
        self.blur = blur

    def corrupt_and_restore(self, image, generator=None):
        restored = torch.nn.functional.avg_pool3d(image, 3, 1, 1, count_include_pad=False) if self.blur else image
        return {"identity": (image, restored)}


def test_restoration_fidelity_scores_perfect_and_blurred_restorations(images):
    rows = restoration_fidelity(
        {"perfect": Smoother(False), "blurred": Smoother(True)},
        [{"image": images}, {"image": images[:1]}],
        cutoffs=(64,),
    )
    perfect, blurred = rows
    assert perfect["crops"] == 3 and perfect["energy_ratio@64"] == pytest.approx(1.0)
    assert math.isinf(perfect["psnr"])
    assert blurred["energy_ratio@64"] < 0.7 and blurred["input_energy_ratio@64"] == pytest.approx(1.0)
    assert 10 < blurred["highpass_psnr@64"] < 60
