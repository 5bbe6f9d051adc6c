"""Hi-End-MAE is the method of the paper: taps, their order, the loss and its target."""

import pytest
import torch
from monai.networks.nets import UNETR

from medssl.encoders import SEGMENTATION_PREFIX, build_segmentation_network
from medssl.engine import SeededInferer
from medssl.losses import patch_normalise
from medssl.masking import gather_tokens, masked_token_ids, patchify, scatter_tokens
from medssl.models.hiend_mae import HiEndMAE

IMG = 32  # 2^3 tokens of 16^3: tiny but a real 3D grid


def tiny_model(**kwargs) -> HiEndMAE:
    torch.manual_seed(0)
    args = dict(img_size=IMG, encoder_size="tiny", decoder_hidden_size=48, decoder_num_heads=4, mask_ratio=0.5)
    return HiEndMAE(**(args | kwargs))


def image(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 1, IMG, IMG, IMG, generator=torch.Generator().manual_seed(1))


def test_cross_attention_reads_taps_9_6_3_in_that_order():
    model = tiny_model().eval()
    taps, contexts = {}, []
    for index, block in enumerate(model.encoder.blocks):
        block.register_forward_hook(lambda _m, _i, out, index=index: taps.__setitem__(index, out))
    for block in model.decoder_cross_blocks:
        block.cross_attn.register_forward_pre_hook(
            lambda _m, _args, kwargs: contexts.append(kwargs["context"]), with_kwargs=True
        )
    model(image())
    assert len(contexts) == 3
    for context, tap, projection in zip(contexts, (9, 6, 3), model.tap_projections):
        torch.testing.assert_close(context, projection(taps[tap]))
    # Taps 3/6/9 are raw block outputs: no LayerNorm (their mean over width is not ~0).
    assert not torch.allclose(taps[9].mean(-1), torch.zeros(()), atol=1e-3)


def test_only_the_final_tap_is_normed():
    model = tiny_model().eval()
    x = image()
    mask = model.draw_mask(x.shape[0], x.device)
    latent, hidden = model.encoder(x, mask.ids_keep)
    torch.testing.assert_close(latent, model.encoder.norm(hidden[-1]))


def _override_prediction(model: HiEndMAE, edit):
    return model.decoder_pred.register_forward_hook(lambda _m, _i, out: edit(out))


def _masked_target(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The normalised target of the masked tokens in raster order: (B, M, P)."""
    target = patch_normalise(patchify(x, 16))
    return target[mask.bool()].reshape(x.shape[0], -1, target.shape[-1])


def test_loss_ignores_visible_patches_and_uses_normalised_target():
    model = tiny_model().eval()
    x = image()
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    baseline = model(x, generator())
    visible = 1 - baseline["mask"]

    # The head, and the last decoder block's cross-attention and MLP, run on the masked tokens only.
    seen = []
    hooks = [module.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape)))
             for module in (model.decoder_cross_blocks[-1].cross_attn, model.decoder_cross_blocks[-1].mlp,
                            model.decoder_pred)]
    model(x, generator())
    for hook in hooks:
        hook.remove()
    assert seen == [(2, int(baseline["mask"][0].sum()), 48)] * 3
    assert (baseline["pred"] * visible.unsqueeze(-1) == 0).all()

    handle = _override_prediction(model, lambda out: _masked_target(x, baseline["mask"]))
    perfect = model(x, generator())
    handle.remove()
    assert perfect["loss"].item() < 1e-10


def test_mask_ratio_and_gradients():
    model = tiny_model(mask_ratio=0.75, img_size=64)
    output = model(torch.rand(2, 1, 64, 64, 64))
    assert output["mask"].sum(1).tolist() == [48.0, 48.0]
    output["loss"].backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(model.get_parameter(n).grad is not None for n in trainable)
    # The fixed position embeddings are not trained.
    assert not model.decoder_pos_embed.requires_grad
    assert not model.encoder.patch_embedding.position_embeddings.requires_grad


def test_decoder_predicts_what_running_every_block_on_every_token_predicts():
    model = tiny_model(mask_ratio=0.75, img_size=64).eval()
    x = torch.rand(2, 1, 64, 64, 64)
    mask = model.draw_mask(2, x.device, torch.Generator().manual_seed(3))
    latent, hidden = model.encoder(x, mask.ids_keep)
    ids_masked = masked_token_ids(mask)
    tokens = scatter_tokens(model.decoder_embed(latent), mask.ids_restore, model.mask_token) + model.decoder_pos_embed
    for block in model.decoder_self_blocks:
        tokens = block(tokens)
    for block, projection, tap in zip(model.decoder_cross_blocks, model.tap_projections, model.tap_order):
        tokens = block(tokens, context=projection(hidden[tap]))
    expected = model.decoder_pred(model.decoder_norm(gather_tokens(tokens, ids_masked)))
    torch.testing.assert_close(model.decode(latent, hidden, mask, ids_masked), expected, atol=1e-5, rtol=1e-5)


def test_encoder_weights_load_into_unetr_by_prefix_change():
    model = tiny_model(img_size=64)
    flat = model.state_dict()
    encoder = {k[len("encoder."):]: v for k, v in flat.items() if k.startswith("encoder.")}
    unetr = build_segmentation_network("vit", "tiny", out_channels=3, img_size=64)
    assert isinstance(unetr, UNETR)
    target = unetr.state_dict()
    renamed = {SEGMENTATION_PREFIX["vit"] + k: v for k, v in encoder.items()}
    assert set(renamed) == {k for k in target if k.startswith("vit.")}
    unetr.load_state_dict(renamed, strict=False)
    x = torch.rand(1, 1, 64, 64, 64)
    model.eval()
    unetr.eval()
    with torch.no_grad():
        ours, ours_hidden = model.encoder(x)
        theirs, theirs_hidden = unetr.vit(x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for index in (3, 6, 9):
        torch.testing.assert_close(ours_hidden[index], theirs_hidden[index], atol=1e-5, rtol=1e-5)


def test_seeded_masks_are_reproducible_and_errors_beat_nothing_at_init():
    model = tiny_model().eval()
    x = image()
    inferer = SeededInferer(seed=0)
    first, second = inferer(x, model), inferer(x, model)
    torch.testing.assert_close(first["mask"], second["mask"])
    errors = SeededInferer(seed=0, method="reconstruction_errors")(x, model)
    assert errors["masked_loss"].shape == (2,)
    # With the normalised target, predicting each patch's mean scores the patch's var/(var+eps) ~ 1.
    torch.testing.assert_close(errors["patch_mean_loss"], torch.ones(2), atol=1e-3, rtol=0)


def test_figure_panels_denormalise_with_patch_statistics():
    model = tiny_model().eval()
    x = image(1)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    mask = model(x, generator())["mask"]
    handle = _override_prediction(model, lambda out: _masked_target(x, mask))
    panels = model.figure_panels(x, generator())
    handle.remove()
    torch.testing.assert_close(panels["reconstruction"], x, atol=1e-4, rtol=0)
    assert (panels["masked input"] == 0).float().mean() == pytest.approx(0.5, abs=0.01)
