"""bench/bench_finetune_step.py: float32 and amp steps of seg_finetune's pieces, and their report section."""

import json

import torch
from bench_script import load_bench_script

load_bench_script("bench_pretrain_step")  # imported by the script as a sibling module
bench = load_bench_script("bench_finetune_step")
report = load_bench_script("report")


def test_the_two_precisions_differ_only_in_the_bundles_amp():
    float32 = bench.build_step("demo", "cnn", False, torch.device("cpu"))
    amp = bench.build_step("demo", "cnn", True, torch.device("cpu"))
    assert (float32.inferer.enabled, amp.inferer.enabled) == (False, True)  # bfloat16 autocast on the CPU
    assert not float32.cuda_amp and not amp.cuda_amp
    assert float32.image.shape == (2, 1, 64, 64, 64)  # demo.json: 2 crops of 64³
    torch.testing.assert_close(float32.image, amp.image, rtol=0, atol=0)
    for (name, a), b in zip(float32.network.state_dict().items(), amp.network.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_run_writes_both_step_times_and_the_report_shows_the_speed_up(tmp_path):
    out = tmp_path / "results" / "finetune_step_demo.json"
    bench.main(["--networks", "cnn", "--steps", "1", "--warmup", "0", "--threads", "1", "--out", str(out)])
    entry = json.loads(out.read_text())["networks"]["cnn"]
    assert entry["network"] == "SegResNet" and entry["gflop"] > 1
    assert entry["speedup"] == entry["float32"]["seconds_median"] / entry["amp"]["seconds_median"]
    text = report.build_report(out.parent)
    assert "### Fine-tuning step, demo preset (cpu, float32 and amp)" in text
    assert f"| cnn (SegResNet) | 2×1×64×64×64 | {entry['gflop']:.1f} |" in text
