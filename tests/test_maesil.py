"""MAESIL: the dual mask, the network contract, the loss and the baselines (tiny sizes)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ViT

from medssl.baselines import BASELINES, build_baseline
from medssl.masking import dual_masking, patchify
from medssl.models.maesil import MAESIL


def tiny_maesil(**kwargs) -> MAESIL:
    torch.manual_seed(0)
    args = dict(
        superpatch_size=32, encoder_size="tiny", encoder_layers=2, encoder_heads=3, decoder_hidden_size=48, decoder_layers=1, decoder_heads=4
    )
    return MAESIL(**(args | kwargs))


def image(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, size, size, size, generator=torch.Generator().manual_seed(seed))


# ---- dual mask -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid, plane_ratio, depth_ratio",
    [((16, 16, 16), 0.5, 0.5), ((16, 16, 16), 0.75, 0.25), ((4, 6, 5), 0.5, 0.5), ((8, 8, 3), 0.25, 0.75)],
)
def test_dual_mask_counts_and_tube_structure(grid, plane_ratio, depth_ratio):
    h, w, d = grid
    batch = 3
    mask = dual_masking(batch, grid, plane_ratio, depth_ratio, generator=torch.Generator().manual_seed(0))
    kept_positions = round(h * w * (1 - plane_ratio))
    per_slab = round(kept_positions * (1 - depth_ratio))
    visible = (mask.mask == 0).reshape(batch, h * w, d)  # raster order: depth fastest

    # exact counts: per_slab visible tokens in every depth slab, d * per_slab per sample
    assert torch.equal(visible.sum(1), torch.full((batch, d), per_slab))
    assert mask.ids_keep.shape == (batch, d * per_slab)
    # tubes: in-plane positions outside the kept set S are masked through all depth; the
    # positions ever visible lie inside S (and fill it here: every slab draws per_slab of S)
    ever_visible = visible.any(2).sum(1)
    assert torch.all(ever_visible <= kept_positions)
    if per_slab * d >= 2 * kept_positions:
        assert torch.equal(ever_visible, torch.full((batch,), kept_positions))
    # bookkeeping: ids_keep lists the visible tokens ascending; ids_restore inverts the shuffle
    flat_visible = (mask.mask == 0)
    assert torch.equal(torch.gather(flat_visible, 1, mask.ids_keep), torch.ones_like(mask.ids_keep, dtype=torch.bool))
    assert torch.all(mask.ids_keep.diff(dim=1) > 0)
    assert torch.equal(torch.sort(mask.ids_restore, dim=1).values, torch.arange(h * w * d).expand(batch, -1))


def test_paper_grid_keeps_1024_of_4096_tokens_in_128_tubes():
    mask = dual_masking(2, (16, 16, 16), generator=torch.Generator().manual_seed(1))
    visible = (mask.mask == 0).reshape(2, 256, 16)
    assert mask.ids_keep.shape == (2, 1024)
    assert torch.equal(visible.any(2).sum(1), torch.tensor([128, 128]))
    assert not torch.equal(visible[0], visible[1])  # per-sample masks


def test_dual_mask_is_reproducible_from_generator():
    a = dual_masking(2, (4, 4, 4), generator=torch.Generator().manual_seed(5))
    b = dual_masking(2, (4, 4, 4), generator=torch.Generator().manual_seed(5))
    c = dual_masking(2, (4, 4, 4), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.mask, b.mask) and not torch.equal(a.mask, c.mask)


# ---- network ---------------------------------------------------------------------------------


def test_forward_contract_and_visible_tokens_only():
    model = tiny_maesil()
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    out = model(image(), generator=torch.Generator().manual_seed(0))
    assert set(out) >= {"loss", "pred", "mask"} and out["loss"].ndim == 0
    assert out["pred"].shape == (2, 64, 512) and out["mask"].shape == (2, 64)
    # 4 x 4 in-plane grid: 8 kept positions, 4 per depth slab, 4 slabs -> 16 visible tokens
    assert seen == [torch.Size([2, 16, 192])]
    assert torch.equal(out["mask"].sum(1), torch.tensor([48.0, 48.0]))


def test_loss_is_mse_on_masked_tokens_only():
    model = tiny_maesil()
    x = image()
    out = model(x, generator=torch.Generator().manual_seed(1))
    error = ((out["pred"] - patchify(x, 8)) ** 2).mean(-1)  # (B, N)
    expected = (error * out["mask"]).sum() / out["mask"].sum()
    torch.testing.assert_close(out["loss"], expected)
    assert not torch.allclose(out["loss"], error.mean())


def test_norm_pix_loss_regresses_normalised_patches():
    model = tiny_maesil(norm_pix_loss=True)
    x = image()
    out = model(x, generator=torch.Generator().manual_seed(1))
    target = patchify(x, 8)
    target = (target - target.mean(-1, keepdim=True)) / torch.sqrt(target.var(-1, unbiased=False, keepdim=True) + 1e-6)
    error = ((out["pred"] - target) ** 2).mean(-1)
    torch.testing.assert_close(out["loss"], (error * out["mask"]).sum() / out["mask"].sum())


def test_padding_never_counts_in_the_loss():
    model = tiny_maesil()
    x = image()
    valid = torch.ones_like(x)
    valid[..., 20:] = 0  # the last 12 slices are padding
    out = model(x, valid=valid, generator=torch.Generator().manual_seed(2))
    weight = out["mask"].unsqueeze(-1) * patchify(valid, 8)
    expected = (((out["pred"] - patchify(x, 8)) ** 2) * weight).sum() / weight.sum()
    torch.testing.assert_close(out["loss"], expected)


def test_generator_makes_the_step_reproducible_and_backward_reaches_everything():
    model = tiny_maesil()
    x = image()
    a = model(x, generator=torch.Generator().manual_seed(3))
    b = model(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["mask"], b["mask"])
    a["loss"].backward()
    assert model.decoder.mask_token.grad.abs().sum() > 0
    assert model.encoder.patch_embedding.patch_embeddings.weight.grad.abs().sum() > 0
    assert model.decoder.position_embedding.grad is None  # fixed sin-cos


def test_a_few_steps_reduce_the_loss():
    model = tiny_maesil()
    x = image(seed=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(15):
        loss = model(x, generator=torch.Generator().manual_seed(step))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_attention_runs_through_scaled_dot_product_attention(monkeypatch):
    model = tiny_maesil()
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs["query"].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    model(image(1), generator=torch.Generator().manual_seed(0))
    # 2 encoder blocks on 16 visible tokens, 1 decoder block on all 64
    assert [shape[-2] for shape in calls] == [16, 16, 64]


def test_reconstruct_is_unmasked_and_deterministic():
    model = tiny_maesil().eval()
    x = image()
    with torch.no_grad():
        a, b = model.reconstruct(x), model.reconstruct(x)
    assert a.shape == x.shape and torch.equal(a, b)


def test_figure_panels_show_the_dual_mask():
    model = tiny_maesil().eval()
    x = image(1)
    with torch.no_grad():
        panels = model.figure_panels(x, generator=torch.Generator().manual_seed(0))
    assert list(panels) == ["input", "masked input", "reconstruction"]
    assert all(p.shape == x.shape for p in panels.values())
    masked_tokens = patchify(panels["masked input"], 8).abs().sum(-1) == 0  # (1, 64)
    assert int(masked_tokens.sum()) == 48
    # visible tokens are pasted from the input, masked ones predicted
    torch.testing.assert_close(patchify(panels["reconstruction"], 8)[~masked_tokens], patchify(x, 8)[~masked_tokens])


def test_encoder_weights_load_into_monai_vit():
    model = tiny_maesil()
    encoder_state = {k[len("encoder.") :]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    vit = ViT(1, 32, 8, hidden_size=192, mlp_dim=768, num_layers=2, num_heads=3, proj_type="conv",
              pos_embed_type="sincos", qkv_bias=True)
    vit.load_state_dict(encoder_state, strict=True)


def test_wrong_input_size_names_the_fix():
    with pytest.raises(ValueError, match="RandSuperpatchCropd"):
        tiny_maesil()(torch.rand(1, 1, 24, 32, 32))
    with pytest.raises(ValueError, match="divisible"):
        MAESIL(superpatch_size=30, patch_size=8)


# ---- baselines -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_follow_the_contract_and_ignore_padding(name):
    torch.manual_seed(0)
    model = build_baseline(name, superpatch_size=32, latent_channels=16, vae_latent_size=32, channels=(8, 16)).eval()
    x = image()
    valid = torch.ones_like(x)
    valid[..., 24:] = 0
    with torch.no_grad():
        out = model(x, valid=valid)
        pred = model.reconstruct(x)
    assert pred.shape == x.shape and out["pred"].shape == x.shape and out["loss"].ndim == 0
    mse = out.get("mse", out["loss"])
    torch.testing.assert_close(mse, ((out["pred"] - x) ** 2)[..., :24].mean())
    assert set(model.figure_panels(x)) == {"input", "reconstruction"}


def test_baseline_latents_match_the_token_grid():
    ae = build_baseline("ae", superpatch_size=32, latent_channels=24, channels=(8, 16))
    assert ae.autoencoder.encode(torch.rand(1, 1, 32, 32, 32)).shape == (1, 24, 4, 4, 4)
    vq = build_baseline("vqvae", superpatch_size=32, latent_channels=24, channels=(8, 16))
    assert vq.autoencoder.encode(torch.rand(1, 1, 32, 32, 32)).shape == (1, 24, 4, 4, 4)
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baseline("gan")
