"""bundles/seg_finetune: train from a pretraining bundle, evaluate, infer, export; fine-tuning options."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out

from medssl.data.phantoms import LABELS, generate_phantom, write_phantom_dataset
from medssl.encoders import GeneralizedUNETR, build_encoder, build_segmentation_network
from medssl.segmentation import (
    SegmentationOverlayHandler,
    freeze_encoder,
    label_subset,
    name_metric_classes,
    parameter_groups,
    pretrained_network,
)

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "seg_finetune"
CONFIGS = BUNDLE / "configs"
SCHEMA = Path("/work/shared/monai/meta_schema_20240725.json")
ROI = [32, 32, 32]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Three labelled 40^3 phantoms at the bundle's 1.5 mm (two train, one validation)."""
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), num=3, shape=(40, 40, 40), spacing=(1.5, 1.5, 1.5))


def tiny(dataset_json: Path, out: Path, kind: str = "vit") -> dict:
    """Overrides that make the paper recipe run in seconds."""
    return {
        "bundle_root": str(BUNDLE),
        "dataset_dir": str(dataset_json),
        "ckpt_dir": str(out / "models"),
        "output_dir": str(out / "eval"),
        "num_val": 1,
        "epochs": 1,
        "warmup_epochs": 0,
        "val_interval": 1,
        "roi_size": ROI,
        "num_samples": 1,
        "num_workers": 0,
        "sw_batch_size": 8,
        "network_kind": kind,
        "encoder_size": "tiny",
    }


def run_workflow(config_files: list[Path], workflow_type: str, **override) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=[str(f) for f in config_files], workflow_type=workflow_type, meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,  # keep pytest's log capture (the bundle's logging.conf replaces root handlers)
        **override,
    )
    workflow.initialize()
    assert workflow.check_properties() in ([], None)
    workflow.run()
    workflow.finalize()
    return workflow


# MAESIL's demo encoder (ViT-tiny, 8^3 tokens, 4 blocks) as seg_finetune's encoder_args name it.
MAESIL_ENCODER_ARGS = {"patch_size": 8, "num_layers": 4}


def pretraining_bundle(root: Path, name: str = "hiend_mae") -> Path:
    """A pretraining bundle folder as its training leaves it: models/model.pt of the whole network.

    hiend_mae: ViT-tiny at ROI; maesil: the demo's encoder (ViT-tiny, patch 8, 4 blocks) on ROI superpatches.
    """
    bundle = root / name
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").mkdir()
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0", "monai_version": monai.__version__}))
    torch.manual_seed(3)
    if name == "maesil":
        from medssl.models.maesil import MAESIL

        network = MAESIL(superpatch_size=ROI, patch_size=MAESIL_ENCODER_ARGS["patch_size"], encoder_size="tiny",
                         encoder_layers=MAESIL_ENCODER_ARGS["num_layers"], encoder_heads=3, decoder_hidden_size=48,
                         decoder_heads=4)
        state = network.state_dict()
    else:
        try:
            from medssl.models.hiend_mae import HiEndMAE

            network = HiEndMAE(img_size=ROI, encoder_size="tiny", decoder_hidden_size=48, decoder_num_heads=4)
            state = network.state_dict()
        except ImportError:
            state = {f"encoder.{k}": v for k, v in build_encoder("vit", "tiny", img_size=ROI).state_dict().items()}
    torch.save(state, bundle / "models" / "model.pt")
    return bundle


def test_metadata_is_schema_valid_and_names_every_organ():
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    channels = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert channels == {str(k): v for k, v in LABELS.items()}
    assert metadata["network_data_format"]["outputs"]["pred"]["num_channels"] == len(LABELS)
    if not SCHEMA.is_file():
        pytest.skip(f"{SCHEMA} not on this machine")
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))


def test_train_from_a_pretraining_bundle_then_evaluate_and_infer(phantoms, tmp_path, caplog):
    bundles = tmp_path / "bundles"
    pretraining_bundle(bundles)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        train = run_workflow(
            [CONFIGS / "train.json", CONFIGS / "demo.json"], "train",
            **tiny(phantoms, out), **{"pretrained#bundle_name": "hiend_mae", "pretrained#bundle_dir": str(bundles)},
        )
    assert "copied 173 of 173 vit encoder tensors" in caplog.text
    evaluator = train.parser.get_parsed_content("validate#evaluator")
    assert 0.0 <= evaluator.state.best_metric <= 1.0 and evaluator.state.best_metric_epoch == 1
    assert (out / "models" / "model.pt").is_file()  # best model by mean foreground Dice
    assert list((out / "models").glob("checkpoint_epoch=1.pt"))  # resumable
    assert (out / "eval" / "figures" / "overlay_epoch0001.png").stat().st_size > 10_000
    trained = (out / "models" / "model.pt").read_bytes()
    assert set(torch.load(out / "models" / "model.pt", weights_only=True)) == set(
        build_segmentation_network("vit", "tiny", len(LABELS), ROI).state_dict()
    )

    # Evaluation: per-organ Dice and HD95 of the best model, organs named in the CSV reports.
    run_workflow([CONFIGS / "train.json", CONFIGS / "evaluate.json"], "eval", **tiny(phantoms, out))
    with open(out / "eval" / "val_mean_dice_raw.csv") as f:
        rows = list(csv.reader(f))
    header, cases = rows[0], rows[1:]
    assert header == ["filename", *[LABELS[k] for k in sorted(LABELS) if k], "mean"]
    assert len(cases) == 1 and cases[0][0].endswith("phantom_002.nii.gz")
    assert all(0.0 <= float(v) <= 1.0 for v in cases[0][1:] if v != "nan")
    assert (out / "eval" / "val_hd95_vox_summary.csv").is_file()
    assert (out / "models" / "model.pt").read_bytes() == trained  # evaluation never overwrites the model

    # Inference on a scan with another grid and orientation: output has the input's shape and affine.
    scans = tmp_path / "scans"
    scans.mkdir()
    image, _, affine = generate_phantom((30, 36, 28), (2.0, 1.8, 2.4), seed=11)
    affine = np.diag([-1.0, 1.0, 1.0, 1.0]) @ affine  # left-right flipped (LAS) storage
    nib.save(nib.Nifti1Image(image, affine), str(scans / "scan.nii.gz"))
    run_workflow([CONFIGS / "inference.json"], "infer", **(tiny(scans, out) | {"output_dir": str(tmp_path / "pred")}))
    written = nib.load(str(tmp_path / "pred" / "scan_seg.nii.gz"))
    assert written.shape == image.shape
    np.testing.assert_allclose(written.affine, affine, atol=1e-4)
    values = np.unique(np.asarray(written.dataobj))
    assert set(values.tolist()) <= set(LABELS) and written.get_data_dtype() == np.uint8


def test_finetune_from_a_maesil_bundle_with_its_patch_8_encoder(phantoms, tmp_path, caplog):
    bundles = tmp_path / "bundles"
    pretrained = torch.load(pretraining_bundle(bundles, "maesil") / "models" / "model.pt", weights_only=True)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        train = run_workflow(
            [CONFIGS / "train.json", CONFIGS / "demo.json"], "train",
            **tiny(phantoms, out), encoder_args=MAESIL_ENCODER_ARGS, amp=True,
            **{"pretrained#bundle_name": "maesil", "pretrained#bundle_dir": str(bundles)},
        )
    assert "copied 61 of 61 vit encoder tensors" in caplog.text  # 3 embedding + 4 blocks x 14 + 2 norm
    # amp on the CPU: bfloat16 autocast in both inferers, MONAI's CUDA-only amp (float16, scaler) off.
    assert train.parser.get_parsed_content("train#inferer").enabled
    assert train.parser.get_parsed_content("validate#inferer").enabled
    assert not train.parser.get_parsed_content("train#trainer").amp
    network = train.parser.get_parsed_content("network")
    assert isinstance(network, GeneralizedUNETR) and network.skip_blocks == (0, 1, 2)
    # The patch embedding was fine-tuned from MAESIL's, not from a random start.
    start = pretrained["encoder.patch_embedding.patch_embeddings.weight"]
    trained = torch.load(out / "models" / "model.pt", weights_only=True)
    assert set(trained) == set(build_segmentation_network("vit", "tiny", len(LABELS), ROI,
                                                          encoder_args=MAESIL_ENCODER_ARGS).state_dict())
    moved = trained["vit.patch_embedding.patch_embeddings.weight"] - start
    assert 0 < moved.abs().max() < 0.1 * start.abs().max()
    evaluator = train.parser.get_parsed_content("validate#evaluator")
    assert 0.0 <= evaluator.state.best_metric <= 1.0


def test_cnn_from_scratch_label_count_and_resume(phantoms, tmp_path, caplog):
    with pytest.raises(RuntimeError, match="pretrained_network") as caught:  # MONAI wraps the config's error
        run_workflow([CONFIGS / "train.json", CONFIGS / "demo.json"], "train",
                     **tiny(phantoms, tmp_path / "frozen", "cnn"), freeze_encoder=True)
    assert "freeze_encoder is true but no pretrained source" in str(caught.value.__cause__)
    with caplog.at_level(logging.INFO):
        workflow = run_workflow([CONFIGS / "train.json", CONFIGS / "demo.json"], "train",
                                **tiny(phantoms, tmp_path / "scratch", "cnn"), label_count=1)
    assert "training from scratch" in caplog.text
    assert "training on the first 1 of 2 labelled cases" in caplog.text
    assert len(workflow.parser.get_parsed_content("train#dataset")) == 1
    assert (tmp_path / "scratch" / "models" / "model.pt").is_file()
    # The same command with a larger epoch budget continues from the checkpoint of epoch 1.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed = run_workflow([CONFIGS / "train.json", CONFIGS / "demo.json"], "train",
                               **(tiny(phantoms, tmp_path / "scratch", "cnn") | {"epochs": 2}), label_count=1)
    assert "resuming from" in caplog.text and "checkpoint_epoch=1.pt" in caplog.text
    trainer = resumed.parser.get_parsed_content("train#trainer")
    assert (trainer.state.epoch, trainer.state.iteration) == (2, 2)  # one new epoch of one iteration


def test_ids_that_monai_label_and_the_zoo_read():
    from monai.bundle import ConfigParser

    train = ConfigParser()
    train.read_config(str(CONFIGS / "train.json"))
    for key in ("network", "network_def", "train#trainer#max_epochs", "train#dataset#data", "validate#dataset#data",
                "train#handlers", "validate#evaluator", "val_interval", "dataset_dir", "bundle_root", "device"):
        assert key in train, key
    infer = ConfigParser()
    infer.read_config(str(CONFIGS / "inference.json"))
    for key in ("network_def", "preprocessing", "postprocessing", "inferer", "device", "bundle_root", "output_dir"):
        assert key in infer, key


@pytest.mark.parametrize("amp", [True, False])
def test_amp_means_bfloat16_autocast_on_the_cpu_in_training_evaluation_and_inference(amp):
    from monai.bundle import ConfigParser

    for config, evaluator in (("train.json", "validate#evaluator#amp"), ("inference.json", "evaluator#amp")):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / config))
        parser.update({"device": "$torch.device('cpu')", "amp": amp})
        inferer = "validate#inferer" if config == "train.json" else "inferer"
        assert parser.get_parsed_content(inferer).enabled is amp, config
        assert parser.get_parsed_content(evaluator) is False, config  # MONAI's amp autocasts CUDA only


@pytest.mark.parametrize("encoder_args", [{}, MAESIL_ENCODER_ARGS], ids=["monai_unetr", "patch8_unetr"])
def test_verify_net_in_out_and_torchscript_export(tmp_path, encoder_args):
    # The metadata's 96^3 input through MONAI's UNETR and the patch-8 UNETR (tiny widths to keep it quick).
    verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                      config_file=str(CONFIGS / "inference.json"), bundle_root=str(BUNDLE), encoder_size="tiny",
                      encoder_args=encoder_args)
    torch.manual_seed(0)
    network = build_segmentation_network("vit", "tiny", len(LABELS), ROI, encoder_args=encoder_args).eval()
    assert isinstance(network, GeneralizedUNETR) == bool(encoder_args)
    torch.save(network.state_dict(), tmp_path / "model.pt")
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(tmp_path / "model.pt"),
                meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.json"),
                bundle_root=str(BUNDLE), encoder_size="tiny", roi_size=ROI, encoder_args=encoder_args)
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.rand(1, 1, *ROI, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.jit.optimized_execution(False):  # skip the JIT's profiling runs
        logits = exported(x)
        assert logits.shape == (1, len(LABELS), *ROI)
        torch.testing.assert_close(logits, network(x), atol=1e-4, rtol=1e-4)


# Fine-tuning options (medssl.segmentation)


def test_layer_decay_groups_follow_vit_depth_and_skip_decay_on_norms():
    network = build_segmentation_network("vit", "tiny", 3, 32)
    groups = parameter_groups(network, "vit", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    level_of = {id(p): g for g in groups for p in g["params"]}
    named = dict(network.named_parameters())
    assert level_of[id(named["vit.patch_embedding.patch_embeddings.weight"])]["lr"] == pytest.approx(1e-3 * 0.5**13)
    assert level_of[id(named["vit.blocks.0.attn.qkv.weight"])]["lr"] == pytest.approx(1e-3 * 0.5**12)
    assert level_of[id(named["vit.blocks.11.attn.qkv.weight"])]["lr"] == pytest.approx(1e-3 * 0.5)
    assert level_of[id(named["out.conv.conv.weight"])]["lr"] == pytest.approx(1e-3)
    assert level_of[id(named["vit.blocks.3.norm1.weight"])]["weight_decay"] == 0.0
    assert level_of[id(named["vit.blocks.3.attn.qkv.weight"])]["weight_decay"] == 0.05
    trainable = [p for p in network.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)  # the groups are usable as they are
    assert len(optimizer.param_groups) == len(groups)
    with pytest.raises(ValueError, match="layer_decay"):
        parameter_groups(network, "vit", lr=1e-3, layer_decay=1.5)


@pytest.mark.parametrize("kind", ["swin", "cnn"])
def test_layer_decay_levels_for_swin_and_cnn(kind):
    network = build_segmentation_network(kind, "tiny", 3, 64)
    groups = parameter_groups(network, kind, lr=1.0, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(network.named_parameters())
    stem, first, last = {
        "swin": ("swinViT.patch_embed.proj.weight", "swinViT.layers1.0.blocks.0.attn.qkv.weight",
                 "swinViT.layers4.0.blocks.0.attn.qkv.weight"),
        "cnn": ("convInit.conv.weight", "down_layers.0.1.conv1.conv.weight", "down_layers.3.1.conv1.conv.weight"),
    }[kind]
    assert lr_of[id(named[stem])] == pytest.approx(0.5**5)
    assert lr_of[id(named[first])] == pytest.approx(0.5**4)
    assert lr_of[id(named[last])] == pytest.approx(0.5)
    decoder = next(n for n in named if not n.startswith(("swinViT.", "convInit.", "down_layers.")))
    assert lr_of[id(named[decoder])] == 1.0


def test_frozen_encoder_gets_no_gradient_and_no_optimizer_group(tmp_path):
    encoder = build_encoder("vit", "tiny", img_size=32)
    torch.save({f"encoder.{k}": v for k, v in encoder.state_dict().items()}, tmp_path / "model.pt")
    network = pretrained_network(build_segmentation_network("vit", "tiny", 3, 32), "vit",
                                 {"model_path": str(tmp_path / "model.pt")}, freeze=True)
    frozen = [n for n, p in network.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("vit.") for n in frozen)
    assert all(p.requires_grad for n, p in network.named_parameters() if not n.startswith("vit."))
    grouped = {id(p) for g in parameter_groups(network, "vit", lr=1e-4) for p in g["params"]}
    assert not grouped & {id(p) for p in network.vit.parameters()}
    network(torch.rand(1, 1, 32, 32, 32)).mean().backward()
    assert all(p.grad is None for p in network.vit.parameters())
    assert freeze_encoder(build_segmentation_network("cnn", "tiny", 3, 32), "cnn") > 0


def test_label_subset_takes_the_first_cases():
    cases = [{"image": f"{i}.nii.gz", "label": f"l{i}.nii.gz"} for i in range(10)]
    assert label_subset(cases) == cases
    assert label_subset(cases, count=3) == cases[:3]
    assert label_subset(cases, fraction=0.25) == cases[:3]  # ceil(2.5)
    assert label_subset(cases, fraction=0.1) == cases[:1]
    for bad in ({"count": 0}, {"count": 11}, {"fraction": 0.0}, {"fraction": 0.5, "count": 2}):
        with pytest.raises(ValueError):
            label_subset(cases, **bad)


def test_metric_reports_get_organ_names(tmp_path):
    (tmp_path / "dice_raw.csv").write_text("filename,class0,class1,mean\na.nii.gz,0.5,0.7,0.6\n")
    (tmp_path / "dice_summary.csv").write_text("class,mean,median\nclass0,0.5,0.5\nclass1,0.7,0.7\nmean,0.6,0.6\n")
    name_metric_classes(tmp_path, ["dice"], ["liver", "spleen"])
    assert (tmp_path / "dice_raw.csv").read_text() == "filename,liver,spleen,mean\na.nii.gz,0.5,0.7,0.6\n"
    assert (tmp_path / "dice_summary.csv").read_text().splitlines()[1:3] == ["liver,0.5,0.5", "spleen,0.7,0.7"]
    with pytest.raises(FileNotFoundError, match="no MetricsSaver report"):
        name_metric_classes(tmp_path, ["hd95"], ["liver"])


def test_overlay_handler_draws_label_and_prediction(tmp_path):
    from ignite.engine import Engine

    label = torch.zeros(3, 16, 16, 16)
    label[0] = 1
    label[0, 4:12, 4:12, 4:12], label[2, 4:12, 4:12, 4:12] = 0, 1  # one-hot: organ 2 in a cube
    engine = Engine(lambda e, b: [{"image": torch.rand(1, 16, 16, 16), "label": label, "pred": label}])
    SegmentationOverlayHandler(tmp_path, interval=2).attach(engine)
    engine.run([0, 1], max_epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay_epoch0001.png", "overlay_epoch0003.png"]
