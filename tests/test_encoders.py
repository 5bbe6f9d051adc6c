"""Encoders load into MONAI's networks with only a prefix change and compute the same thing."""

import pytest
import torch
from monai.networks.blocks import TransformerBlock
from monai.networks.nets import ViT

from medssl.encoders import (
    ENCODER_SIZES,
    SEGMENTATION_PREFIX,
    CNNEncoder,
    GeneralizedUNETR,
    SwinEncoder,
    ViTEncoder,
    build_encoder,
    build_segmentation_network,
    transformer_block_rows,
)
from medssl.masking import gather_tokens, random_masking


def _copy_into(encoder: torch.nn.Module, network: torch.nn.Module, prefix: str) -> None:
    renamed = {prefix + k: v for k, v in encoder.state_dict().items()}
    expected = {k for k in network.state_dict() if k.startswith(prefix)} if prefix else None
    if expected is not None:
        assert set(renamed) == expected
    missing, unexpected = network.load_state_dict(renamed, strict=False)
    assert not unexpected
    assert not [k for k in missing if k in renamed]


def test_vit_matches_monai_vit_and_unetr_vit():
    torch.manual_seed(0)
    encoder = build_encoder("vit", "tiny", img_size=64).eval()
    assert isinstance(encoder, ViTEncoder)
    args = ENCODER_SIZES["vit"]["tiny"]
    monai_vit = ViT(1, 64, 16, args["hidden_size"], args["mlp_dim"], args["num_layers"], args["num_heads"],
                    qkv_bias=True).eval()
    monai_vit.load_state_dict(encoder.state_dict(), strict=True)
    unetr = build_segmentation_network("vit", "tiny", out_channels=2, img_size=64).eval()
    _copy_into(encoder, unetr, SEGMENTATION_PREFIX["vit"])
    x = torch.randn(2, 1, 64, 64, 64)
    with torch.no_grad():
        ours, ours_hidden = encoder(x)
        for theirs, theirs_hidden in (monai_vit(x), unetr.vit(x)):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
            for index in (3, 6, 9):
                torch.testing.assert_close(ours_hidden[index], theirs_hidden[index], atol=1e-5, rtol=1e-5)


def test_vit_on_visible_tokens_equals_full_embedding_then_gather():
    torch.manual_seed(0)
    encoder = build_encoder("vit", "tiny", img_size=64, num_layers=2).eval()
    x = torch.randn(2, 1, 64, 64, 64)
    mask = random_masking(2, encoder.num_tokens, 0.75, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        visible, hidden = encoder(x, mask.ids_keep)
        tokens = gather_tokens(encoder.patch_embedding(x), mask.ids_keep)
        for block in encoder.blocks:
            tokens = block(tokens)
    assert visible.shape == (2, 16, 192) and len(hidden) == 2
    torch.testing.assert_close(visible, encoder.norm(tokens))
    # A Python int: torch.compile traces a numpy integer (MONAI's n_patches) as a tensor, and the
    # mask drawn from it then fails to compile.
    assert type(encoder.num_tokens) is int and encoder.num_tokens == encoder.patch_embedding.n_patches == 64


def test_vit_attention_goes_through_sdpa(monkeypatch):
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("query", args[0] if args else None).shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    encoder = build_encoder("vit", "tiny", img_size=32, num_layers=3)
    encoder(torch.randn(1, 1, 32, 32, 32))
    assert len(calls) == 3


def test_swin_encoder_loads_into_swin_unetr():
    torch.manual_seed(0)
    encoder = build_encoder("swin", "tiny").eval()
    assert isinstance(encoder, SwinEncoder)
    network = build_segmentation_network("swin", "tiny", out_channels=3).eval()
    _copy_into(encoder, network, SEGMENTATION_PREFIX["swin"])
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        for ours, theirs in zip(encoder(x), network.swinViT(x, network.normalize)):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_cnn_encoder_loads_into_segresnet():
    torch.manual_seed(0)
    encoder = build_encoder("cnn", "tiny").eval()
    assert isinstance(encoder, CNNEncoder)
    network = build_segmentation_network("cnn", "tiny", out_channels=3).eval()
    encoder_keys = set(encoder.state_dict())
    assert encoder_keys == {k for k in network.state_dict() if k.startswith(("convInit.", "down_layers."))}
    _copy_into(encoder, network, SEGMENTATION_PREFIX["cnn"])
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        _, theirs = network.encode(x)
        for ours, reference in zip(encoder(x), theirs):
            torch.testing.assert_close(ours, reference)


def test_factory_sizes_and_errors():
    large = build_encoder("vit", "large", img_size=96)
    assert large.hidden_size == 1536 and len(large.blocks) == 12 and large.num_tokens == 512
    # Hi-End-MAE's large (patch 12) gets a UNETR too; its width shrunk here to keep the test quick.
    narrow = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 4}
    network = build_segmentation_network("vit", "large", 2, img_size=48, encoder_args=narrow)
    assert isinstance(network, GeneralizedUNETR) and network.vit.patch_embedding.n_patches == 64
    with pytest.raises(ValueError, match="not divisible by the ViT patch size 12"):
        build_segmentation_network("vit", "large", 2, img_size=96 + 16, encoder_args=narrow)
    with pytest.raises(ValueError, match="unknown encoder kind 'resnet'"):
        build_encoder("resnet")
    with pytest.raises(ValueError, match="unknown swin size 'huge'"):
        build_encoder("swin", "huge")


def test_2d_vit():
    encoder = build_encoder("vit", "tiny", img_size=64, spatial_dims=2, num_layers=1)
    out, _ = encoder(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 16, 192)


@pytest.mark.parametrize("with_cross_attention", [False, True])
def test_block_rows_equal_the_full_block_at_those_rows(with_cross_attention):
    torch.manual_seed(0)
    block = TransformerBlock(24, 96, 4, qkv_bias=True, with_cross_attention=with_cross_attention,
                             use_flash_attention=True)
    x = torch.randn(2, 10, 24, requires_grad=True)
    context = torch.randn(2, 3, 24) if with_cross_attention else None
    rows = torch.tensor([[7, 1, 4], [0, 9, 2]])
    expected = gather_tokens(block(x, context=context), rows)
    got = transformer_block_rows(block, x, rows, context=context)
    torch.testing.assert_close(got, expected)
    weights = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), [x, *block.parameters()], allow_unused=True)
    got_grads = torch.autograd.grad((got * weights).sum(), [x, *block.parameters()], allow_unused=True)
    for want, have in zip(expected_grads, got_grads):
        assert (want is None) == (have is None)
        if want is not None:
            torch.testing.assert_close(have, want)
