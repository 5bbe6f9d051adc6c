import pytest
import torch

from bench_script import load_bench_script

study = load_bench_script("study")  # imported by the script as a sibling module
encoder_ablation = load_bench_script("encoder_ablation")


def _states():
    generator = torch.Generator().manual_seed(0)
    initial = {"conv.weight": torch.randn(4, 2, 3, 3, 3, generator=generator),
               "norm.weight": torch.ones(4), "norm.bias": torch.zeros(4)}
    pretrained = {"conv.weight": 3.0 * torch.randn(4, 2, 3, 3, 3, generator=generator),
                  "norm.weight": torch.full((4,), 0.5), "norm.bias": torch.full((4,), 0.1),
                  "decoder.weight": torch.randn(2, 2)}  # not the encoder's: left out
    return pretrained, initial


def test_random_at_pretrained_norms_keeps_the_initial_directions_at_the_pretrained_norms():
    pretrained, initial = _states()
    state = encoder_ablation.variant_encoder("random_at_pretrained_norms", pretrained, initial)
    assert state.keys() == initial.keys()
    weight = state["conv.weight"]
    assert weight.norm() == pytest.approx(pretrained["conv.weight"].norm().item(), rel=1e-5)
    assert torch.allclose(weight / weight.norm(), initial["conv.weight"] / initial["conv.weight"].norm(), atol=1e-6)
    assert torch.equal(state["norm.weight"], initial["norm.weight"])
    assert torch.equal(state["norm.bias"], initial["norm.bias"])


def test_pretrained_at_initial_norms_keeps_the_pretrained_directions_and_norm_layers():
    pretrained, initial = _states()
    state = encoder_ablation.variant_encoder("pretrained_at_initial_norms", pretrained, initial)
    weight = state["conv.weight"]
    assert weight.norm() == pytest.approx(initial["conv.weight"].norm().item(), rel=1e-5)
    assert torch.allclose(weight / weight.norm(), pretrained["conv.weight"] / pretrained["conv.weight"].norm(),
                          atol=1e-6)
    assert torch.equal(state["norm.bias"], pretrained["norm.bias"])
    ratios = dict(encoder_ablation.norm_ratios(pretrained, initial))
    assert list(ratios) == ["conv.weight"]
    assert ratios["conv.weight"] == pytest.approx(
        (pretrained["conv.weight"].norm() / initial["conv.weight"].norm()).item(), rel=1e-6)


def test_an_unknown_variant_is_refused():
    pretrained, initial = _states()
    with pytest.raises(ValueError, match="unknown variant"):
        encoder_ablation.variant_encoder("pretrained", pretrained, initial)


def test_shallow_and_deep_variants_split_a_segresnet_encoder_after_its_second_stage():
    names = ["encoder.convInit.conv.weight", "encoder.down_layers.0.1.conv1.conv.weight",
             "encoder.down_layers.1.0.conv.weight", "encoder.down_layers.2.0.conv.weight",
             "encoder.down_layers.3.1.norm1.bias"]
    assert encoder_ablation.levels(names, "cnn") == dict(zip(names, [0, 1, 2, 3, 4]))
    vit = ["encoder.patch_embedding.patch_embeddings.weight", "encoder.blocks.0.mlp.linear1.weight",
           "encoder.blocks.11.attn.qkv.weight", "encoder.norm.weight"]
    assert list(encoder_ablation.levels(vit, "vit").values()) == [0, 1, 12, 13]
    initial = {name: torch.zeros(2, 2) for name in names}
    pretrained = {name: torch.ones(2, 2) for name in names}
    shallow = encoder_ablation.variant_encoder("pretrained_shallow", pretrained, initial, "cnn")
    deep = encoder_ablation.variant_encoder("pretrained_deep", pretrained, initial, "cnn")
    assert [int(shallow[name].sum()) for name in names] == [4, 4, 4, 0, 0]
    assert [int(deep[name].sum()) for name in names] == [0, 0, 0, 4, 4]


def test_the_table_gives_each_seed_and_the_mean_over_the_seeds_each_start_has():
    def result(seed: int, mean: float, aorta: float) -> study.RunResult:
        return study.RunResult(study.Start("s", "scratch", {}), 1, seed, {"aorta": aorta}, mean)

    results = {"scratch": [result(2, 0.40, 0.60), result(5, 0.50, 0.50)],
               "pretrained_deep": [result(2, 0.30, 0.0), None]}
    lines = encoder_ablation.ablation_table(results, [2, 5], "aorta")
    assert lines[0] == "| seed | scratch | pretrained_deep |"
    assert lines[2] == "| 2 | 40.0 (60.0) | 30.0 (0.0) |"
    assert lines[3] == "| 5 | 50.0 (50.0) | n/a |"
    assert lines[4] == "| mean ± sd | 45.0 ± 7.1 (55.0 ± 7.1) | 30.0 (0.0) |"


def test_pretrained_at_initial_activations_rescales_only_what_feeds_each_stage():
    network = {"network_kind": "cnn", "encoder_size": "tiny", "roi_size": [16, 16, 16], "encoder_args": {}}
    initial = study.random_encoder_state(network, 0)
    pretrained = {name: tensor * 3.0 if tensor.ndim > 1 else tensor for name, tensor in
                  study.random_encoder_state(network, 1).items()}
    image = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    state = encoder_ablation.at_initial_activations(pretrained, initial, network, image)

    reached = encoder_ablation.stage_inputs_rms(state, network, image)
    assert len(reached) == 4
    assert reached == pytest.approx(encoder_ablation.stage_inputs_rms(initial, network, image), rel=1e-4)
    assert encoder_ablation.stage_inputs_rms(pretrained, network, image)[3] > 10 * reached[3]
    feeding = ["encoder.convInit.conv.weight"] + [f"encoder.down_layers.{stage}.0.conv.weight" for stage in (1, 2, 3)]
    changed = [name for name in state if not torch.equal(state[name], pretrained[name])]
    assert changed == feeding
    for name in feeding:  # a positive factor: the filters' directions stay the pretrained ones
        factor = (state[name] / pretrained[name]).flatten()
        assert 0 < factor[0] < 1
        assert torch.allclose(factor, factor[0].expand_as(factor), rtol=1e-4)
