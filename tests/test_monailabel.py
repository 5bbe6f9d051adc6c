"""seg_finetune inside MONAI Label: a headless server of the `monaibundle` sample app, real requests.

The trained (tiny) bundle sits in the app's model folder, `zoo_source` is set so that MONAI Label
fetches nothing; the test sends a real `infer` request on a generated scan and a real `train`
request for one epoch over HTTP on the loopback interface. Those need the optional extra
(`make test-monailabel` builds build/venv-monailabel and runs this file) and are skipped, with the
reason, where MONAI Label is not installed or cannot import; the check of the bundle's
preprocessing on MONAI Label's input dict runs everywhere.
"""

from __future__ import annotations

import email
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from medssl.data.phantoms import LABELS, generate_phantom, write_phantom_dataset


def _why_monailabel_cannot_run() -> str | None:
    if importlib.util.find_spec("monailabel") is None:
        return "MONAI Label is not installed: `make test-monailabel` installs the [monailabel] extra in build/venv-monailabel and runs this file"
    try:
        import monailabel.tasks.infer.bundle  # noqa: F401  (imports torchvision at module level)
    except Exception as error:  # torchvision built for another torch raises RuntimeError, not ImportError
        return f"MONAI Label is installed but cannot import here ({type(error).__name__}: {error}); see README.md, MONAI Label"
    return None


SKIP_REASON = _why_monailabel_cannot_run()
needs_monailabel = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "seg_finetune"
MODEL = "seg_finetune"
# What a user sets in their copy of the bundle to serve a small model on a CPU.
TINY = {"network_kind": "vit", "encoder_size": "tiny", "roi_size": [32, 32, 32], "sw_batch_size": 4, "num_workers": 0,
        "num_samples": 1, "warmup_epochs": 0, "val_interval": 1, "cache_rate": 0.0}
SERVER_START_LIMIT_S = 180
REQUEST_LIMIT_S = 300


def tiny_bundle(model_dir: Path) -> Path:
    """A copy of seg_finetune whose train/inference configs use the tiny network."""
    bundle = Path(shutil.copytree(BUNDLE, model_dir / MODEL, ignore=shutil.ignore_patterns("models", "eval", "data", "__pycache__")))
    for config in ("train.json", "inference.json"):
        path = bundle / "configs" / config
        content = json.loads(path.read_text())
        content.update({key: value for key, value in TINY.items() if key in content})
        path.write_text(json.dumps(content, indent=4))
    return bundle


def train_tiny(bundle: Path, dataset_json: Path, run_dir: Path) -> None:
    """One epoch of the bundle's own training; only the final models/model.pt goes into the bundle."""
    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "train.json"), workflow_type="train", logging_file=False,
        bundle_root=str(bundle), dataset_dir=str(dataset_json), ckpt_dir=str(run_dir / "models"),
        output_dir=str(run_dir / "eval"), num_val=1, epochs=1, device="$torch.device('cpu')",
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    (bundle / "models").mkdir()
    shutil.copyfile(run_dir / "models" / "model.pt", bundle / "models" / "model.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, bundle folder, studies folder, the scan to segment) of a running MONAI Label server."""
    import httpx
    import monailabel

    root = tmp_path_factory.mktemp("monailabel")
    sample_app = Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle"
    if not sample_app.is_dir():
        sample_app = Path(monailabel.__file__).resolve().parents[1] / "sample-apps" / "monaibundle"
    app = Path(shutil.copytree(sample_app, root / "app"))
    bundle = tiny_bundle(app / "model")
    phantoms = write_phantom_dataset(root / "phantoms", num=3, shape=(40, 40, 40), spacing=(1.5, 1.5, 1.5))
    train_tiny(bundle, phantoms, root / "first_run")

    # Studies: two labelled phantoms (MONAI Label's layout: labels/final/<image name>) and one
    # unlabelled scan on another grid and orientation to segment.
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for case in json.loads(phantoms.read_text())["training"][:2]:
        image, label = (phantoms.parent / case[key] for key in ("image", "label"))
        shutil.copyfile(image, studies / image.name)
        shutil.copyfile(label, studies / "labels" / "final" / image.name)
    scan, _, affine = generate_phantom((30, 36, 28), (2.0, 1.8, 2.4), seed=11)
    affine = np.diag([-1.0, 1.0, 1.0, 1.0]) @ affine
    nib.save(nib.Nifti1Image(scan, affine), str(studies / "scan.nii.gz"))

    port = free_port()
    env = os.environ | {
        "MONAI_LABEL_TRACKING_ENABLED": "false",  # no MLflow store
        "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",  # no file watcher thread
        "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
               "--conf", "models", MODEL, "--conf", "zoo_source", "github", "--conf", "sam2", "false",
               "--conf", "preload", "false", "--host", "127.0.0.1", "--port", str(port)]
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_LIMIT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"MONAI Label server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"MONAI Label server not up after {SERVER_START_LIMIT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url, bundle, studies, scan, affine, log_path
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@needs_monailabel
def test_app_lists_the_bundle_with_the_organ_names_of_channel_def(server):
    import httpx

    url, *_ = server
    info = httpx.get(f"{url}/info/", timeout=30).json()
    organs = {name: index for index, name in LABELS.items() if index}
    assert info["models"][MODEL]["labels"] == organs
    assert MODEL in info["trainers"]


@needs_monailabel
def test_infer_request_returns_a_segmentation_on_the_scans_grid(server, tmp_path):
    import httpx

    url, _, _, scan, affine, log_path = server
    response = httpx.post(f"{url}/infer/{MODEL}", params={"image": "scan", "output": "all"},
                          data={"params": json.dumps({"device": "cpu"})}, timeout=REQUEST_LIMIT_S)
    assert response.status_code == 200, response.text[-2000:]
    message = email.message_from_bytes(
        f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode() + response.content
    )
    parts = {part.get_param("name", header="content-disposition"): part for part in message.get_payload()}
    params = json.loads(parts["params"].get_payload(decode=True))
    assert params["label_names"] == {name: index for index, name in LABELS.items() if index}
    written = tmp_path / parts["image"].get_filename()
    written.write_bytes(parts["image"].get_payload(decode=True))
    segmentation = nib.load(str(written))
    assert segmentation.shape == scan.shape
    np.testing.assert_allclose(segmentation.affine, affine, atol=1e-4)
    assert set(np.unique(np.asarray(segmentation.dataobj)).tolist()) <= set(LABELS)


@needs_monailabel
def test_train_request_runs_one_epoch_from_the_bundles_model(server):
    import httpx

    url, bundle, *_ = server
    before = torch.load(bundle / "models" / "model.pt", weights_only=True)
    request = {"max_epochs": 1, "device": "cpu", "val_split": 0.5, "multi_gpu": False, "pretrained": True, "tracking": "None"}
    response = httpx.post(f"{url}/train/{MODEL}", params={"run_sync": "true"}, json=request, timeout=REQUEST_LIMIT_S)
    assert response.status_code == 200, response.text[-2000:]
    assert list((bundle / "models").glob("checkpoint_epoch=1.pt"))  # the bundle's own training ran one epoch
    after = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert set(after) == set(before)
    assert any(not torch.equal(after[key], before[key]) for key in before)  # trained from the loaded weights


def test_inference_preprocessing_keeps_monai_labels_image_path_and_ignores_it(tmp_path):
    # MONAI Label's infer task hands the preprocessing {"image": path, "image_path": path, ...};
    # MONAI 1.6's Spacingd took `image_path` for a metadata dict and failed on it.
    scan, _, affine = generate_phantom((30, 36, 28), (2.0, 1.8, 2.4), seed=11)
    path = str(tmp_path / "scan.nii.gz")
    nib.save(nib.Nifti1Image(scan, affine), path)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    preprocessing = parser.get_parsed_content("preprocessing")

    plain = preprocessing({"image": path})
    as_monai_label = preprocessing({"image": path, "image_path": path, "model": MODEL})
    assert as_monai_label["image_path"] == path and as_monai_label["model"] == MODEL
    torch.testing.assert_close(as_monai_label["image"].as_tensor(), plain["image"].as_tensor(), rtol=0, atol=0)
    torch.testing.assert_close(as_monai_label["image"].affine, plain["image"].affine, rtol=0, atol=0)
