"""UNETR for every ViT the pretraining bundles write: patch 8 (MAESIL), 12 (Hi-End-MAE large), 16; any depth."""

import json

import monai
import pytest
import torch
from monai.networks.nets import UNETR

from medssl import zoo
from medssl.encoders import (
    GeneralizedUNETR,
    ViTLinearSegmenter,
    build_encoder,
    build_segmentation_network,
    unetr_skip_blocks,
    unetr_upsampling,
)
from medssl.segmentation import pretrained_network

ROI = 32
TINY_PATCH8 = {"patch_size": 8, "num_layers": 4}  # MAESIL's demo encoder: ViT-tiny, 8^3 tokens, 4 blocks


def test_skip_blocks_follow_monai_at_depth_12_and_stay_distinct_below():
    assert unetr_skip_blocks(12) == (3, 6, 9)  # MONAI's UNETR and Hi-End-MAE's taps
    assert unetr_skip_blocks(24) == (6, 12, 18)
    assert unetr_skip_blocks(8) == (2, 4, 6)
    assert unetr_skip_blocks(6) == (1, 3, 4)  # MAESIL's paper encoder
    assert unetr_skip_blocks(4) == (0, 1, 2)  # MAESIL's demo encoder
    assert unetr_skip_blocks(3) == (0, 0, 1)
    for depth in range(4, 40):  # three taps and the last block: four different blocks, in order
        taps = unetr_skip_blocks(depth)
        assert 0 <= taps[0] < taps[1] < taps[2] < depth - 1, depth
    with pytest.raises(ValueError, match="at least one block"):
        unetr_skip_blocks(0)


def test_upsampling_factors_multiply_to_the_patch_size():
    assert unetr_upsampling(16) == (2, 2, 2, 2)
    assert unetr_upsampling(8) == (1, 2, 2, 2)
    assert unetr_upsampling(12) == (1, 2, 2, 3)
    assert unetr_upsampling(4) == (1, 1, 2, 2)
    for patch in (32, 48, 0):
        with pytest.raises(ValueError, match=f"patch size {patch} does not fit"):
            unetr_upsampling(patch)


def test_at_patch_16_and_depth_12_it_is_monai_unetr():
    torch.manual_seed(0)
    unetr = build_segmentation_network("vit", "tiny", 3, ROI).eval()
    assert type(unetr) is UNETR  # the default network stays MONAI's own
    general = GeneralizedUNETR(1, 3, ROI, patch_size=16, hidden_size=192, mlp_dim=768, num_layers=12, num_heads=3)
    general.load_state_dict(unetr.state_dict(), strict=True)  # same keys, same shapes
    x = torch.rand(2, 1, ROI, ROI, ROI, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(general.eval()(x), unetr(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "encoder_args, roi, grid_strides",
    [
        (TINY_PATCH8, 32, {"enc2": 2, "enc3": 4, "enc4": 8, "tokens": 8}),  # UNETR's skip strides
        ({"patch_size": 12, "num_layers": 12}, 48, {"enc2": 3, "enc3": 6, "enc4": 12, "tokens": 12}),
    ],
    ids=["patch8", "patch12"],
)
def test_scripted_network_gives_full_resolution_logits(encoder_args, roi, grid_strides):
    torch.manual_seed(0)
    network = build_segmentation_network("vit", "tiny", 3, roi, encoder_args=encoder_args).eval()
    assert isinstance(network, GeneralizedUNETR)
    assert network.skip_blocks == unetr_skip_blocks(encoder_args["num_layers"])
    x = torch.rand(2, 1, roi, roi, roi, generator=torch.Generator().manual_seed(1))
    scripted = torch.jit.script(network)
    skips = {}

    def keep_shape(module, _inputs, output):
        skips[module] = output.shape

    for name in ("encoder2", "encoder3", "encoder4"):
        getattr(network, name).register_forward_hook(keep_shape)
    with torch.no_grad():
        eager = network(x)
        with torch.jit.optimized_execution(False):  # skip the JIT's profiling runs
            torch.testing.assert_close(scripted(x), eager)
    assert eager.shape == (2, 3, roi, roi, roi)
    for name, channels in (("encoder2", 32), ("encoder3", 64), ("encoder4", 128)):
        stride = grid_strides[f"enc{name[-1]}"]
        assert skips[getattr(network, name)] == (2, channels, roi // stride, roi // stride, roi // stride), name
    assert network.feat_size == (roi // grid_strides["tokens"],) * 3


def test_attention_goes_through_sdpa(monkeypatch):
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    network = build_segmentation_network("vit", "tiny", 2, ROI, encoder_args=TINY_PATCH8)
    network(torch.rand(1, 1, ROI, ROI, ROI))
    assert len(calls) == 4
    unused = [n for n, p in network.named_parameters() if not p.requires_grad]
    assert unused and all(".norm_cross_attn." in n for n in unused)  # DDP: no unused trainable parameter


def test_configuration_errors_name_the_setting():
    with pytest.raises(ValueError, match=r"roi_size\) is not divisible by the ViT patch size 8"):
        build_segmentation_network("vit", "tiny", 2, 36, encoder_args=TINY_PATCH8)
    with pytest.raises(ValueError, match=r"encoder_args \['depth'\] are not vit encoder settings"):
        build_segmentation_network("vit", "tiny", 2, ROI, encoder_args={"depth": 6})
    with pytest.raises(ValueError, match="skip_blocks must be three block indices in \\[0, 3\\]"):
        GeneralizedUNETR(1, 2, ROI, hidden_size=48, mlp_dim=96, num_layers=4, num_heads=2, skip_blocks=(1, 2, 4))
    with pytest.raises(ValueError, match="decoder 'linear' with network_kind 'cnn'"):
        build_segmentation_network("cnn", "tiny", 2, ROI, decoder="linear")
    cnn = build_segmentation_network("cnn", "tiny", 2, ROI, encoder_args={"init_filters": 16})
    assert cnn.convInit.conv.out_channels == 16  # tiny has 8


def _maesil_bundle(root, **encoder):
    """A MAESIL bundle folder as its demo training leaves it: models/model.pt of the whole network."""
    maesil = pytest.importorskip("medssl.models.maesil")
    torch.manual_seed(0)
    model = maesil.MAESIL(superpatch_size=ROI, encoder_size="tiny", decoder_hidden_size=48, decoder_heads=4, **encoder)
    bundle = root / "maesil"
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").mkdir()
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0", "monai_version": monai.__version__}))
    torch.save(model.state_dict(), bundle / "models" / "model.pt")
    return model.eval()


def test_maesil_encoder_loads_completely_and_computes_the_same(tmp_path):
    model = _maesil_bundle(tmp_path, patch_size=8, encoder_layers=4, encoder_heads=3)
    network = build_segmentation_network("vit", "tiny", 3, ROI, encoder_args=TINY_PATCH8)
    report = zoo.load_pretrained_encoder(network, "vit", bundle_name="maesil", bundle_dir=tmp_path)
    assert report.complete and len(report.copied) == report.expected == len(model.encoder.state_dict()) == 61
    network.eval()
    x = torch.rand(2, 1, ROI, ROI, ROI, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, ours_hidden = network.vit(x)
        theirs, theirs_hidden = model.encoder(x)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        for block in network.skip_blocks:
            torch.testing.assert_close(ours_hidden[block], theirs_hidden[block], atol=1e-5, rtol=1e-5)
        assert network(x).shape == (2, 3, ROI, ROI, ROI)

    # Through the bundle's loading path, with the encoder frozen for probing.
    frozen = pretrained_network(build_segmentation_network("vit", "tiny", 3, ROI, encoder_args=TINY_PATCH8), "vit",
                                {"bundle_name": "maesil", "bundle_dir": str(tmp_path)}, freeze=True)
    assert not any(p.requires_grad for p in frozen.vit.parameters())


@pytest.mark.parametrize(
    "size, encoder_args, offending",
    [
        ("small", TINY_PATCH8, "encoder.blocks.0.attn.qkv.weight: pretrained (576, 192) vs network (1152, 384)"),
        ("tiny", {"patch_size": 8, "num_layers": 6}, "vit.blocks.5.mlp.linear1.weight"),
        ("tiny", {"patch_size": 16, "num_layers": 4},
         "encoder.patch_embedding.patch_embeddings.weight: pretrained (192, 1, 8, 8, 8) vs network (192, 1, 16, 16, 16)"),
    ],
    ids=["width", "depth", "patch"],
)
def test_maesil_encoder_into_another_geometry_fails_with_the_keys(tmp_path, size, encoder_args, offending):
    _maesil_bundle(tmp_path, patch_size=8, encoder_layers=4, encoder_heads=3)
    network = build_segmentation_network("vit", size, 3, ROI, encoder_args=encoder_args)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(zoo.EncoderMismatchError) as caught:
        zoo.load_pretrained_encoder(network, "vit", bundle_name="maesil", bundle_dir=tmp_path)
    assert offending in str(caught.value)
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())  # nothing half-loaded


def test_encoder_of_any_depth_loads_into_its_network(tmp_path):
    for depth, patch in ((6, 8), (12, 8), (2, 16)):
        encoder = build_encoder("vit", "tiny", img_size=ROI, patch_size=patch, num_layers=depth)
        torch.save({f"encoder.{k}": v for k, v in encoder.state_dict().items()}, tmp_path / "model.pt")
        network = build_segmentation_network("vit", "tiny", 2, ROI, encoder_args={"patch_size": patch, "num_layers": depth})
        report = zoo.load_pretrained_encoder(network, "vit", model_path=tmp_path / "model.pt")
        assert report.complete and report.expected == 3 + 14 * depth + 2, (depth, patch)


def test_linear_decoder_reads_the_image_only_through_the_tokens():
    """With the patch projection zeroed, UNETR still sees the image (its raw-image branch); the linear head does not."""
    torch.manual_seed(0)
    x, other = torch.rand(2, 1, 1, ROI, ROI, ROI, generator=torch.Generator().manual_seed(3))
    for decoder, sees_image in (("default", True), ("linear", False)):
        network = build_segmentation_network("vit", "tiny", 3, ROI, encoder_args=TINY_PATCH8, decoder=decoder).eval()
        with torch.no_grad():
            network.vit.patch_embedding.patch_embeddings.weight.zero_()
            changed = not torch.allclose(network(x), network(other))
        assert changed == sees_image, decoder
    assert isinstance(network, ViTLinearSegmenter) and network(x).shape == (1, 3, ROI, ROI, ROI)


def test_linear_probe_trains_only_the_head(tmp_path):
    _maesil_bundle(tmp_path, patch_size=8, encoder_layers=4, encoder_heads=3)
    network = pretrained_network(
        build_segmentation_network("vit", "tiny", 3, ROI, encoder_args=TINY_PATCH8, decoder="linear"), "vit",
        {"bundle_name": "maesil", "bundle_dir": str(tmp_path)}, freeze=True,
    )
    before = {k: v.clone() for k, v in network.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-2, fused=True)
    x = torch.rand(2, 1, ROI, ROI, ROI, generator=torch.Generator().manual_seed(4))
    torch.nn.functional.cross_entropy(network(x), torch.randint(0, 3, (2, ROI, ROI, ROI))).backward()
    optimizer.step()
    changed = {k for k, v in network.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith(("norm.", "head.")) for k in changed), sorted(changed)
    assert {"head.weight", "head.bias", "norm.weight", "norm.bias"} <= changed
