"""medssl.zoo: exact encoder loading from pretraining bundles and zoo archives, offline."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import zipfile
from pathlib import Path

import monai.bundle
import monai.bundle.scripts
import pytest
import torch
import yaml

from monai.apps.utils import HashCheckError
from monai.bundle import ConfigWorkflow, verify_metadata

from medssl import zoo
from medssl.data.phantoms import LABELS
from medssl.encoders import SEGMENTATION_PREFIX, build_encoder, build_segmentation_network

IMG = {"vit": 32, "swin": 64, "cnn": 32}  # UNETR needs multiples of 16; Swin downsamples 32x
BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
BUNDLE_NAMES = ("hiend_mae", "maesil", "frepa", "seg_finetune")
SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "monai" / "meta_schema_20240725.json"


def pretraining_state(kind: str, size: str = "tiny", seed: int = 0) -> dict[str, torch.Tensor]:
    """What a pretraining bundle's models/model.pt holds: encoder under `encoder.` plus a decoder."""
    torch.manual_seed(seed)
    encoder = build_encoder(kind, size, img_size=IMG[kind])
    state = {f"encoder.{key}": value for key, value in encoder.state_dict().items()}
    state["decoder.0.weight"] = torch.randn(4, 4)
    state["mask_token"] = torch.randn(8)
    return state


def make_bundle(root: Path, name: str, state: dict[str, torch.Tensor], version: str = "0.1.0") -> Path:
    bundle = root / name
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").mkdir()
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": version, "monai_version": monai.__version__}))
    # Configs that fail if anything parses them: loading weights must never build the other bundle's network.
    poisoned = {"network_def": {"_target_": "no_such_package.NoSuchNetwork"}, "initialize": ["$1/0"]}
    for workflow in ("train", "inference"):
        (bundle / "configs" / f"{workflow}.json").write_text(json.dumps(poisoned))
    torch.save(state, bundle / "models" / "model.pt")
    return bundle


def network(kind: str, size: str = "tiny") -> torch.nn.Module:
    torch.manual_seed(1)
    return build_segmentation_network(kind, size, out_channels=3, img_size=IMG[kind])


@pytest.mark.parametrize("kind", ["vit", "swin", "cnn"])
def test_every_encoder_tensor_is_copied_from_a_pretraining_bundle(tmp_path, kind, caplog):
    state = pretraining_state(kind)
    make_bundle(tmp_path, f"pre_{kind}", state)
    net = network(kind)
    decoder_before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith(zoo.ENCODER_SUBMODULES[kind])}

    with caplog.at_level(logging.INFO, logger="medssl.zoo"):
        report = zoo.load_pretrained_encoder(net, kind, bundle_name=f"pre_{kind}", bundle_dir=tmp_path)

    encoder_tensors = [k for k in state if k.startswith("encoder.")]
    assert report.complete
    assert report.expected == len(encoder_tensors) == len(report.copied)
    assert f"copied {len(encoder_tensors)} of {len(encoder_tensors)} {kind} encoder tensors" in caplog.text
    after = net.state_dict()
    prefix = SEGMENTATION_PREFIX[kind]
    for key in encoder_tensors:
        torch.testing.assert_close(after[prefix + key[len("encoder."):]], state[key], rtol=0, atol=0)
    for key, value in decoder_before.items():  # the decoder keeps its own initialisation
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)


def test_unetr_vit_gives_the_pretrained_encoders_output(tmp_path):
    encoder = build_encoder("vit", "tiny", img_size=32).eval()
    torch.save({f"encoder.{k}": v for k, v in encoder.state_dict().items()}, tmp_path / "model.pt")
    net = network("vit").eval()
    zoo.load_pretrained_encoder(net, "vit", model_path=tmp_path / "model.pt")
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, expected_hidden = encoder(x)
        tokens, hidden = net.vit(x)
    torch.testing.assert_close(tokens, expected)
    torch.testing.assert_close(hidden[6], expected_hidden[6])


def test_mismatched_encoder_size_fails_listing_the_keys_and_copies_nothing(tmp_path):
    make_bundle(tmp_path, "pre_tiny", pretraining_state("vit", "tiny"))
    net = network("vit", "small")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(zoo.EncoderMismatchError) as caught:
        zoo.load_pretrained_encoder(net, "vit", bundle_name="pre_tiny", bundle_dir=tmp_path)
    message = str(caught.value)
    assert "copied 0 of 173 vit encoder tensors" in message
    assert "encoder.patch_embedding.patch_embeddings.weight: pretrained (192, 1, 16, 16, 16) vs network (384, 1, 16, 16, 16)" in message
    assert "encoder_size" in message  # says what to change
    assert len(caught.value.report.mismatched) == 173
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_missing_tensor_is_an_error_unless_strict_is_off(tmp_path):
    state = pretraining_state("cnn")
    del state["encoder.convInit.conv.weight"]
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(zoo.EncoderMismatchError, match=r"missing from the pretrained weights \(1\):\n    convInit.conv.weight"):
        zoo.load_pretrained_encoder(network("cnn"), "cnn", model_path=tmp_path / "model.pt")
    report = zoo.load_pretrained_encoder(network("cnn"), "cnn", model_path=tmp_path / "model.pt", strict=False)
    assert not report.complete and report.missing == ["convInit.conv.weight"]
    assert len(report.copied) == report.expected - 1


def test_weights_without_an_encoder_prefix_are_refused(tmp_path):
    torch.save(network("cnn").state_dict(), tmp_path / "model.pt")  # a segmentation model, not a pretraining one
    with pytest.raises(zoo.EncoderMismatchError, match="has no tensor under 'encoder.'"):
        zoo.load_pretrained_encoder(network("cnn"), "cnn", model_path=tmp_path / "model.pt")


def test_no_source_means_from_scratch_and_says_so(caplog):
    net = network("cnn")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="medssl.zoo"):
        assert zoo.load_pretrained_encoder(net, "cnn") is None
    assert "training from scratch" in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_missing_bundle_goes_to_monai_download_and_explains_failure(tmp_path, monkeypatch):
    calls = []

    def offline_download(**kwargs):
        calls.append(kwargs)
        raise ConnectionError("no network")

    monkeypatch.setattr(monai.bundle.scripts, "download", offline_download)
    with pytest.raises(RuntimeError, match="pretrained bundle 'absent' is not at .*absent/models/model.pt"):
        zoo.load_pretrained_encoder(network("cnn"), "cnn", bundle_name="absent", bundle_dir=tmp_path, source="github",
                                    version="0.2.0")
    assert calls and calls[0]["name"] == "absent" and calls[0]["version"] == "0.2.0" and calls[0]["source"] == "github"


def test_local_bundle_is_never_downloaded(tmp_path, monkeypatch):
    make_bundle(tmp_path, "pre_cnn", pretraining_state("cnn"))
    monkeypatch.setattr(monai.bundle.scripts, "download", lambda **_: pytest.fail("tried to download a local bundle"))
    assert zoo.load_pretrained_encoder(network("cnn"), "cnn", bundle_name="pre_cnn", bundle_dir=tmp_path).complete


def packable_bundle(root: Path) -> Path:
    bundle = make_bundle(root, "pre_vit", pretraining_state("vit"))
    for junk in ("__pycache__/x.pyc", "eval/figure.png", "data/dataset.json", ".cache/item.pt", "models/checkpoint_1.pt"):
        (bundle / junk).parent.mkdir(parents=True, exist_ok=True)
        (bundle / junk).write_text("junk")
    (bundle / "docs").mkdir()
    (bundle / "docs" / "README.md").write_text("# pre_vit\n")
    return bundle


def large_files(archive: Path, name: str) -> list[dict]:
    return yaml.safe_load(zipfile.ZipFile(archive).read(f"{name}/large_files.yml"))["large_files"]


def test_pack_bundle_writes_a_reproducible_zoo_archive(tmp_path):
    bundle = packable_bundle(tmp_path / "src")
    archive, digest = zoo.pack_bundle(bundle, tmp_path / "zoo")
    assert archive.name == "pre_vit_v0.1.0.zip"
    assert sorted(zipfile.ZipFile(archive).namelist()) == [
        "pre_vit/configs/inference.json", "pre_vit/configs/metadata.json", "pre_vit/configs/train.json",
        "pre_vit/docs/README.md", "pre_vit/large_files.yml", "pre_vit/models/model.pt",
    ]
    assert digest == zoo.file_sha256(archive)
    assert Path(f"{archive}.sha256").read_text() == f"{digest}  pre_vit_v0.1.0.zip\n"
    # The weights are published beside the archive and listed with their sha256 and URL.
    published = tmp_path / "zoo" / "pre_vit_v0.1.0" / "models" / "model.pt"
    assert published.read_bytes() == (bundle / "models" / "model.pt").read_bytes()
    assert large_files(archive, "pre_vit") == [{"path": "models/model.pt", "url": published.resolve().as_uri(),
                                                "hash_val": zoo.file_sha256(published), "hash_type": "sha256"}]
    hub = "https://example.org/{name}/resolve/{version}"
    _, first = zoo.pack_bundle(bundle, tmp_path / "one", weights_url=hub)
    _, second = zoo.pack_bundle(bundle, tmp_path / "two", weights_url=hub)
    assert first == second  # same contents, same checksum
    assert large_files(tmp_path / "one" / archive.name, "pre_vit")[0]["url"] == \
        "https://example.org/pre_vit/resolve/0.1.0/models/model.pt"
    _, without_weights = zoo.pack_bundle(bundle, tmp_path / "light", include_weights=False)
    assert "pre_vit/models/model.pt" not in zipfile.ZipFile(tmp_path / "light" / archive.name).namelist()
    assert large_files(tmp_path / "light" / archive.name, "pre_vit")[0]["path"] == "models/model.pt"
    assert without_weights != digest


def test_zoo_archive_loads_offline_through_monai_download(tmp_path, monkeypatch):
    archive, digest = zoo.pack_bundle(packable_bundle(tmp_path / "src"), tmp_path / "zoo")
    monkeypatch.setattr("urllib.request.socket.create_connection", lambda *a, **k: pytest.fail("network used"))
    report = zoo.load_pretrained_encoder(network("vit"), "vit", url=archive.as_uri(), sha256=digest,
                                         bundle_dir=tmp_path / "bundles")
    assert report.complete and report.expected == 173
    assert (tmp_path / "bundles" / "pre_vit" / "models" / "model.pt").is_file()
    # Again: folder present, nothing re-extracted, same result.
    assert zoo.load_pretrained_encoder(network("vit"), "vit", url=archive.as_uri(), sha256=digest,
                                       bundle_dir=tmp_path / "bundles").complete
    # MONAI's own download takes the archive as is.
    monai.bundle.download(name="pre_vit", bundle_dir=str(tmp_path / "plain"), url=archive.as_uri(), progress=False)
    assert (tmp_path / "plain" / "pre_vit" / "configs" / "metadata.json").is_file()


def test_tampered_archive_is_refused_before_extraction(tmp_path):
    archive, digest = zoo.pack_bundle(packable_bundle(tmp_path / "src"), tmp_path / "zoo")
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(zoo.ArchiveIntegrityError, match="was changed or corrupted after packing"):
        zoo.load_pretrained_encoder(network("vit"), "vit", url=archive.as_uri(), sha256=digest, bundle_dir=tmp_path / "b")
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
    with pytest.raises(zoo.ArchiveIntegrityError, match="no sha256 given"):
        zoo.load_pretrained_encoder(network("vit"), "vit", url=archive.as_uri(), bundle_dir=tmp_path / "b")


@pytest.mark.parametrize("member", ["pre_vit/../../escaped.txt", "/tmp/absolute.txt", "loose.txt"])
def test_archive_member_outside_the_bundle_folder_is_refused(tmp_path, member):
    archive = tmp_path / "pre_vit_v0.1.0.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("pre_vit/configs/metadata.json", "{}")
        zf.writestr(member, "payload")
    with pytest.raises(zoo.ArchiveIntegrityError, match="refused|outside a top-level bundle folder"):
        zoo.load_pretrained_encoder(network("vit"), "vit", url=archive.as_uri(), sha256=zoo.file_sha256(archive),
                                    bundle_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_stale_extracted_bundle_is_reported_not_used(tmp_path):
    first, first_digest = zoo.pack_bundle(make_bundle(tmp_path / "v1", "pre_cnn", pretraining_state("cnn", seed=0)),
                                          tmp_path / "zoo1")
    second, second_digest = zoo.pack_bundle(make_bundle(tmp_path / "v2", "pre_cnn", pretraining_state("cnn", seed=5)),
                                            tmp_path / "zoo2")
    zoo.load_pretrained_encoder(network("cnn"), "cnn", url=first.as_uri(), sha256=first_digest, bundle_dir=tmp_path / "b")
    with pytest.raises(zoo.ArchiveIntegrityError, match="differs from pre_cnn/models/model.pt"):
        zoo.load_pretrained_encoder(network("cnn"), "cnn", url=second.as_uri(), sha256=second_digest,
                                    bundle_dir=tmp_path / "b")


def test_hiend_mae_network_weights_load_into_unetr(tmp_path):
    hiend_mae = pytest.importorskip("medssl.models.hiend_mae")
    torch.manual_seed(0)
    model = hiend_mae.HiEndMAE(img_size=32, encoder_size="tiny", decoder_hidden_size=48, decoder_num_heads=4).eval()
    make_bundle(tmp_path, "hiend_mae", model.state_dict())
    net = network("vit").eval()
    report = zoo.load_pretrained_encoder(net, "vit", bundle_name="hiend_mae", bundle_dir=tmp_path)
    assert report.complete and report.expected == len(model.encoder.state_dict())
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net.vit(x)[0], model.encoder(x)[0])


def test_frepa_network_weights_load_for_every_kind(tmp_path):
    frepa = pytest.importorskip("medssl.models.frepa")
    for kind in ("vit", "swin", "cnn"):
        torch.manual_seed(0)
        model = frepa.FrepaNetwork(encoder_kind=kind, encoder_size="tiny", img_size=IMG[kind], decoder_channels=16)
        torch.save(model.state_dict(), tmp_path / f"{kind}.pt")
        report = zoo.load_pretrained_encoder(network(kind), kind, model_path=tmp_path / f"{kind}.pt")
        assert report.complete and report.expected == len(model.encoder.state_dict()), kind


def test_maesil_network_weights_load_only_with_unetr_geometry(tmp_path):
    maesil = pytest.importorskip("medssl.models.maesil")
    torch.manual_seed(0)
    small = dict(superpatch_size=32, encoder_size="tiny", decoder_hidden_size=48, decoder_heads=4)
    model = maesil.MAESIL(patch_size=16, encoder_layers=12, **small)
    torch.save(model.state_dict(), tmp_path / "unetr_like.pt")
    assert zoo.load_pretrained_encoder(network("vit"), "vit", model_path=tmp_path / "unetr_like.pt").complete
    # The paper's encoder (8^3 tokens, fewer blocks) cannot enter MONAI's UNETR (16^3 tokens, 12 blocks):
    # refused with the offending keys, never half-loaded.
    model = maesil.MAESIL(**small)
    torch.save(model.state_dict(), tmp_path / "paper.pt")
    with pytest.raises(zoo.EncoderMismatchError, match=r"patch_embeddings.weight: pretrained \(192, 1, 8, 8, 8\)"):
        zoo.load_pretrained_encoder(network("vit"), "vit", model_path=tmp_path / "paper.pt")


# The model-zoo format of the real bundles: metadata, `python -m medssl.zoo pack`, MONAI's own API.


def no_network(monkeypatch) -> None:
    monkeypatch.setattr("urllib.request.socket.create_connection", lambda *a, **k: pytest.fail("network used"))


def copy_of(name: str, root: Path) -> Path:
    """A bundle of this repository without its run outputs."""
    return Path(shutil.copytree(BUNDLES / name, root / name, ignore=shutil.ignore_patterns("models", "eval", "data", ".cache", "__pycache__")))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_bundle_metadata_is_complete_and_its_metrics_are_documented(name):
    metadata_file = BUNDLES / name / "configs" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    assert metadata["version"] in metadata["changelog"]
    assert metadata["required_packages_version"]["medssl"] == importlib.metadata.version("medssl")
    assert metadata["references"] and all(isinstance(reference, str) and reference for reference in metadata["references"])
    # Honest metrics: every number is one the bundle's docs report as measured (with its command).
    docs = (BUNDLES / name / "docs" / "README.md").read_text()
    assert metadata["eval_metrics"]
    for key, value in metadata["eval_metrics"].items():
        assert isinstance(value, (int, float)) and f"{value}" in docs, key
    listing = yaml.safe_load((BUNDLES / name / "large_files.yml").read_text())["large_files"]
    assert [(entry["path"], entry["hash_type"]) for entry in listing] == [("models/model.pt", "sha256")]
    if not SCHEMA.is_file():
        pytest.skip(f"{SCHEMA} not on this machine: metadata not checked against the MONAI schema")
    verify_metadata(meta_file=str(metadata_file), filepath=str(SCHEMA))


def test_zoo_cli_packs_bundles_that_monai_downloads_and_loads_offline(tmp_path, monkeypatch, capsys):
    seg = copy_of("seg_finetune", tmp_path / "src")
    (seg / "models").mkdir()
    torch.manual_seed(0)
    trained = build_segmentation_network("vit", "tiny", len(LABELS), [32, 32, 32]).state_dict()
    torch.save(trained, seg / "models" / "model.pt")
    untrained = copy_of("frepa", tmp_path / "src")
    schema = ["--schema", str(SCHEMA)] if SCHEMA.is_file() else []
    assert zoo.main(["pack", "--bundles", str(seg), str(untrained), "--out", str(tmp_path / "zoo"), *schema]) == 0

    version = {name: json.loads((tmp_path / "src" / name / "configs" / "metadata.json").read_text())["version"]
               for name in ("seg_finetune", "frepa")}
    archive = tmp_path / "zoo" / f"seg_finetune_v{version['seg_finetune']}.zip"
    light = tmp_path / "zoo" / f"frepa_v{version['frepa']}.zip"
    assert capsys.readouterr().out.splitlines() == [
        f"{archive}  sha256 {zoo.file_sha256(archive)}", f"{light}  sha256 {zoo.file_sha256(light)}",
    ]
    assert "seg_finetune/models/model.pt" in zipfile.ZipFile(archive).namelist()
    assert large_files(archive, "seg_finetune")[0]["hash_val"] == zoo.file_sha256(seg / "models" / "model.pt")
    assert not [m for m in zipfile.ZipFile(light).namelist() if "/models/" in m]  # untrained: no weights,
    assert large_files(light, "frepa")[0]["hash_val"] == ""  # and the bundle's unpublished listing

    no_network(monkeypatch)
    hub = tmp_path / "hub"
    monai.bundle.download(name="seg_finetune", bundle_dir=str(hub), url=archive.as_uri(), progress=False)
    network = monai.bundle.load(name="seg_finetune", bundle_dir=str(hub), device="cpu", progress=False,
                                net_override={"size": "tiny", "img_size": [32, 32, 32]})
    assert set(network.state_dict()) == set(trained)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)
    # Weights missing from a bundle come back from the zoo through large_files.yml, hash checked.
    assert zoo.verify_large_files(hub / "seg_finetune") == ["models/model.pt"]
    (hub / "seg_finetune" / "models" / "model.pt").unlink()
    monai.bundle.download_large_files(bundle_path=str(hub / "seg_finetune"))
    assert (hub / "seg_finetune" / "models" / "model.pt").read_bytes() == (seg / "models" / "model.pt").read_bytes()


def test_zoo_cli_refuses_metadata_that_fails_the_schema(tmp_path, capsys):
    if not SCHEMA.is_file():
        pytest.skip(f"{SCHEMA} not on this machine")
    bundle = copy_of("hiend_mae", tmp_path / "src")
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    del metadata["required_packages_version"]
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(SystemExit) as caught:
        zoo.main(["pack", "--bundles", str(bundle), "--out", str(tmp_path / "zoo"), "--schema", str(SCHEMA)])
    assert caught.value.code == 1
    assert f"{bundle}: 'required_packages_version' is a required property" in capsys.readouterr().err
    assert not (tmp_path / "zoo").exists()


def test_seg_finetune_names_the_zoo_as_its_pretrained_source(tmp_path, monkeypatch, caplog):
    state = pretraining_state("vit")
    zoo.main(["pack", "--bundles", str(make_bundle(tmp_path / "src", "hiend_mae", state)), "--out", str(tmp_path / "zoo")])
    archive = tmp_path / "zoo" / "hiend_mae_v0.1.0.zip"
    digest = Path(f"{archive}.sha256").read_text().split()[0]
    no_network(monkeypatch)
    workflow = ConfigWorkflow(
        config_file=str(BUNDLES / "seg_finetune" / "configs" / "train.json"), workflow_type="train", logging_file=False,
        bundle_root=str(BUNDLES / "seg_finetune"), network_kind="vit", encoder_size="tiny", roi_size=[32, 32, 32],
        **{"pretrained#url": archive.as_uri(), "pretrained#sha256": digest, "pretrained#bundle_dir": str(tmp_path / "cache")},
    )
    workflow.initialize()
    with caplog.at_level(logging.INFO, logger="medssl.zoo"):
        net = workflow.parser.get_parsed_content("network")
    assert "copied 173 of 173 vit encoder tensors" in caplog.text
    torch.testing.assert_close(net.vit.patch_embedding.patch_embeddings.weight.cpu(),
                               state["encoder.patch_embedding.patch_embeddings.weight"], rtol=0, atol=0)


def test_tampered_weight_file_is_refused(tmp_path):
    archive, _ = zoo.pack_bundle(make_bundle(tmp_path / "src", "pre_cnn", pretraining_state("cnn")), tmp_path / "zoo")
    hub = tmp_path / "hub"
    monai.bundle.download(name="pre_cnn", bundle_dir=str(hub), url=archive.as_uri(), progress=False)
    weights = hub / "pre_cnn" / "models" / "model.pt"
    flip_a_byte(weights)
    with pytest.raises(zoo.ArchiveIntegrityError, match=r"model.pt does not have the sha256 \w+ that .*large_files.yml lists"):
        zoo.load_pretrained_encoder(network("cnn"), "cnn", bundle_name="pre_cnn", bundle_dir=hub)
    with pytest.raises(HashCheckError, match="hash check of existing file failed"):
        monai.bundle.download_large_files(bundle_path=str(hub / "pre_cnn"))
    # A tampered copy in the zoo is refused on download too, and never lands in the bundle.
    weights.unlink()
    flip_a_byte(tmp_path / "zoo" / "pre_cnn_v0.1.0" / "models" / "model.pt")
    with pytest.raises(HashCheckError, match="corrupted or tampered"):
        monai.bundle.download_large_files(bundle_path=str(hub / "pre_cnn"))
    assert not weights.exists()
