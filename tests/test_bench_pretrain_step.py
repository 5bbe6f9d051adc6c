"""bench/bench_pretrain_step.py's official-code role, with a stand-in checkout (the official code is not in this repository)."""

import sys

import pytest
import torch
from bench_script import load_bench_script

bench = load_bench_script("bench_pretrain_step")

# What the official hi_end_mae.py offers, reduced to what the benchmark calls: a builder taking the
# argparse settings, whose model's forward returns the loss. It keeps the settings it was given.
STAND_IN = '''
import torch

class HiEndMAE(torch.nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return ((self.weight * x - 0.5) ** 2).mean()

def build_vit_base_hi_end_mae_p16_3d(args):
    print("the official builder prints its model")
    return HiEndMAE(args)
'''


@pytest.fixture
def stand_in_checkout(tmp_path, monkeypatch):
    (tmp_path / "hi_end_mae.py").write_text(STAND_IN)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "hi_end_mae", raising=False)
    yield tmp_path
    sys.modules.pop("hi_end_mae", None)


def test_official_network_gets_the_bundle_settings_and_its_loss_is_stepped(stand_in_checkout, capsys):
    network = bench.build("hiend_mae", bench.PRESETS["paper"], "official", stand_in_checkout)
    assert capsys.readouterr().out == ""  # the model printout is swallowed
    settings = network.args
    assert (settings.img_size, settings.patch_size, settings.in_chans) == (96, 16, 1)
    assert settings.mask_ratio == 0.75 and settings.pos_embed_type == "sincos"
    image = torch.full((1, 1, 4, 4, 4), 0.25)
    step = bench.make_step("hiend_mae", network, image, bench.PRESETS["paper"])
    before = network.weight.item()
    step()
    assert network.weight.item() > before  # the loss (0.25 * weight - 0.5)^2 falls as the weight grows


def test_official_network_exists_only_at_the_official_config(stand_in_checkout):
    with pytest.raises(ValueError, match="--preset paper"):
        bench.build("hiend_mae", bench.PRESETS["demo"], "official", stand_in_checkout)
    with pytest.raises(ValueError, match="no 'official' network for 'maesil'"):
        bench.build("maesil", bench.PRESETS["paper"], "official", stand_in_checkout)


def test_a_checkout_without_the_official_code_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="hi_end_mae.py"):
        bench.build("hiend_mae", bench.PRESETS["paper"], "official", tmp_path)
