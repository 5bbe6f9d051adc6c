"""bench/bench_profile.py: operator categories, a profiled step whose shares add up, and its report section."""

import json

import pytest
from bench_script import load_bench_script

load_bench_script("bench_pretrain_step")  # imported by the script as a sibling module
bench = load_bench_script("bench_profile")
report = load_bench_script("report")


@pytest.mark.parametrize("op, expected", [
    ("aten::addmm", "matmul"),
    ("aten::mm", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::convolution_backward", "convolution"),
    ("aten::native_layer_norm_backward", "normalisation"),
    ("aten::_fft_r2c", "fft"),
    ("aten::_fused_adamw_", "optimizer"),
    ("aten::linalg_vector_norm", "optimizer"),  # the gradient clipping's norms
    ("aten::gelu_backward", "elementwise"),
    ("aten::add_", "elementwise"),
    ("aten::_softmax_backward_data", "elementwise"),  # MONAI's MAE attends by matrix products and softmax
    ("aten::select", "memory"),  # not "le": names match whole, or by substrings of the other categories
    ("aten::copy_", "memory"),
    ("autograd::engine::evaluate_function: SelectBackward0", "other"),
])
def test_operators_fall_into_their_categories(op, expected):
    assert bench.category(op) == expected


@pytest.mark.parametrize("op, shapes, flops", [
    ("aten::mm", [[108, 768], [768, 3072]], 2 * 108 * 768 * 3072),
    ("aten::addmm", [[3072], [108, 768], [768, 3072]], 2 * 108 * 768 * 3072),  # the bias first
    ("aten::bmm", [[16, 54, 64], [16, 64, 54]], 2 * 16 * 54 * 64 * 54),
])
def test_matrix_product_flops_come_from_the_input_shapes(op, shapes, flops):
    assert bench.matmul_flops(op, shapes) == flops


def test_a_profiled_step_adds_up_and_the_report_lists_it(tmp_path):
    out = tmp_path / "results" / "profile_demo.json"
    bench.main(["--preset", "demo", "--networks", "maesil", "--steps", "1", "--warmup", "1", "--threads", "1",
                "--out", str(out)])
    entry = json.loads(out.read_text())["networks"]["maesil"]
    for role in ("ours", "reference"):
        categories = entry[role]["categories"]
        assert sum(c["share"] for c in categories.values()) == pytest.approx(1)
        assert sum(c["ms_per_step"] for c in categories.values()) == pytest.approx(entry[role]["self_ms_per_step"])
        assert categories["matmul"]["share"] > 0.1
        assert categories["optimizer"]["share"] > 0  # the step includes the bundle's AdamW
        times = [op["ms_per_step"] for op in entry[role]["top_ops"]]
        assert times == sorted(times, reverse=True) and len(times) == bench.TOP_OPS
        assert 0 < entry[role]["matmul_gflop_s"] < 10 * json.loads(out.read_text())["gemm_gflop_s"]
    assert entry["ours"]["categories"]["attention"]["share"] > 0  # MAESIL attends through SDPA
    assert entry["ours"]["network"] == "MAESIL" and entry["reference"]["network"] == "MaskedAutoEncoderViT"
    text = report.build_report(out.parent)
    assert "### Where a pretraining step's time goes, demo preset (cpu, torch.profiler)" in text
    assert f"| maesil | MAESIL | {entry['ours']['profiled_step_s']:.3f} | {entry['ours']['matmul_gflop_s']:.0f} (" in text
