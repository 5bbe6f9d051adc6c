"""Convolutional reconstruction baselines (AE, VAE, VQ-VAE) with the pretraining-network contract.

MAESIL is validated by reconstruction quality against a 3D autoencoder, a variational
autoencoder and a vector-quantised VAE. These wrap MONAI's ``AutoEncoder``, ``VarAutoEncoder``
and ``VQVAE`` so that they train in the same bundle pipeline as MAESIL (same crops, optimiser,
schedule and number of steps) and evaluate through the same superpatch stitching:

- ``forward(image, valid=None)`` -> ``{"loss": scalar, "pred": (B, C, *S) reconstruction}``
  (plus the method's own terms), the loss counting real voxels only when ``valid`` is given;
- ``reconstruct(image)`` -> (B, C, *S) deterministic reconstruction for evaluation;
- ``figure_panels(image, generator=None)`` -> input / reconstruction for the figure handler.

Latent sizes: AE and VQ-VAE downsample by 8 per axis (three stride-2 stages), so their latent
grid is MAESIL's token grid at patch size 8, with ``latent_channels`` values per position (set
it to the ViT width for the same number of latent values as MAESIL's tokens). MONAI's VAE has a
flat latent vector (``vae_latent_size``) between Linear layers: one as large as the others'
latents would need billions of weights at 128^3, so it downsamples once more (by 16, to a
16-channel map) and keeps a smaller vector, as usual for VAE baselines.

:func:`build_baseline` makes one from its name ("ae", "vae", "vqvae");
:func:`evaluate_reconstructions` reconstructs whole held-out volumes with MAESIL and the
baselines and writes the comparison (NIfTI, figures, CSV and Markdown tables).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.data import MetaTensor
from monai.networks.nets import AutoEncoder, VarAutoEncoder, VQVAE
from monai.transforms import Invertd, SaveImage
from monai.utils import ensure_tuple_rep

from medssl.figures import orthogonal_views
from medssl.metrics import psnr, ssim3d
from medssl.superpatch import reconstruct_volume

__all__ = [
    "ConvAutoEncoder",
    "ConvVAE",
    "ConvVQVAE",
    "BASELINES",
    "build_baseline",
    "build_baselines",
    "evaluate_reconstructions",
]

logger = logging.getLogger(__name__)


def _reconstruction_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over all voxels, or over the real ones (valid (B, 1, *S) > 0) only.

    Computed in float32: under float16 autocast the sum over ~10^6 squared errors would overflow.
    """
    error = (pred.float() - target.float()) ** 2
    if valid is None:
        return error.mean()
    weight = (valid > 0).to(error.dtype).expand_as(error)
    return (error * weight).sum() / weight.sum().clamp_min(1.0)


class _ReconstructionBaseline(nn.Module):
    """Shared checks and figure of the baselines; subclasses define ``_run(image)``."""

    def __init__(self, in_channels: int, superpatch_size: Sequence[int] | int, downsampling: int = 8) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.superpatch_size = ensure_tuple_rep(superpatch_size, 3)
        if any(s % downsampling for s in self.superpatch_size):
            raise ValueError(
                f"{type(self).__name__}: superpatch_size {self.superpatch_size} must be divisible by {downsampling}"
            )

    def _check(self, image: torch.Tensor) -> None:
        if tuple(image.shape[1:]) != (self.in_channels, *self.superpatch_size):
            raise ValueError(
                f"{type(self).__name__} takes (B, {self.in_channels}, *{self.superpatch_size}) superpatches, "
                f"got {tuple(image.shape)}: crop with medssl.superpatch.RandSuperpatchCropd or cut volumes with "
                "medssl.superpatch.partition"
            )

    def figure_panels(self, image: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Input and reconstruction, (B, C, *S) each (no masking: ``generator`` is unused)."""
        return {"input": image, "reconstruction": self.reconstruct(image)}


class ConvAutoEncoder(_ReconstructionBaseline):
    """3D convolutional autoencoder (MONAI ``AutoEncoder``), MSE loss.

    Args:
        in_channels: image channels.
        superpatch_size: input size.
        channels: widths of the three stride-2 encoder stages; the last is the latent width.
        num_res_units: residual units per stage.
    """

    def __init__(
        self,
        in_channels: int = 1,
        superpatch_size: Sequence[int] | int = 128,
        channels: Sequence[int] = (32, 64, 768),
        num_res_units: int = 1,
    ) -> None:
        super().__init__(in_channels, superpatch_size)
        self.autoencoder = AutoEncoder(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=in_channels,
            channels=tuple(channels),
            strides=(2, 2, 2),
            num_res_units=num_res_units,
        )

    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        self._check(image)
        return self.autoencoder(image)

    def forward(self, image: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pred = self.reconstruct(image)
        return {"loss": _reconstruction_mse(pred, image, valid), "pred": pred}


class ConvVAE(_ReconstructionBaseline):
    """3D variational autoencoder (MONAI ``VarAutoEncoder``, flat latent, sigmoid output).

    Loss: MSE + ``kl_weight`` * KL(q(z|x) || N(0, I)) per voxel (the KL summed over latent
    dimensions, divided by the voxels of a superpatch, averaged over the batch), i.e. the
    negative ELBO of a Gaussian likelihood with a fixed variance, up to a scale. ``reconstruct``
    decodes the posterior mean.

    Args:
        in_channels: image channels.
        superpatch_size: input size.
        latent_size: length of the latent vector.
        channels: widths of the stride-2 encoder stages; the last stage's output is flattened
            into the Linear layers, so it stays narrow.
        num_res_units: residual units per stage.
        kl_weight: weight of the KL term.
    """

    def __init__(
        self,
        in_channels: int = 1,
        superpatch_size: Sequence[int] | int = 128,
        latent_size: int = 1024,
        channels: Sequence[int] = (32, 64, 64, 16),
        num_res_units: int = 1,
        kl_weight: float = 1.0,
    ) -> None:
        super().__init__(in_channels, superpatch_size, downsampling=2 ** len(channels))
        self.autoencoder = VarAutoEncoder(
            spatial_dims=3,
            in_shape=(in_channels, *self.superpatch_size),
            out_channels=in_channels,
            latent_size=latent_size,
            channels=tuple(channels),
            strides=(2,) * len(channels),
            num_res_units=num_res_units,
            use_mean_at_inference=True,
        )
        self.kl_weight = kl_weight

    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        self._check(image)
        mu, _ = self.autoencoder.encode_forward(image)
        return self.autoencoder.decode_forward(mu)

    def forward(self, image: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self._check(image)
        pred, mu, logvar, _ = self.autoencoder(image)
        mse = _reconstruction_mse(pred, image, valid)
        mu, logvar = mu.float(), logvar.float()
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1).mean() / image[0].numel()
        return {"loss": mse + self.kl_weight * kl, "pred": pred, "mse": mse, "kl": kl}


class ConvVQVAE(_ReconstructionBaseline):
    """3D VQ-VAE (MONAI ``VQVAE``: EMA codebook), loss MSE + commitment (quantisation) loss.

    Args:
        in_channels: image channels.
        superpatch_size: input size.
        channels: widths of the three stride-2 stages.
        num_res_layers: residual layers per stage.
        embedding_dim: code width (latent values per grid position).
        num_embeddings: codebook size.
        commitment_cost: weight of the commitment term inside the quantiser.
    """

    def __init__(
        self,
        in_channels: int = 1,
        superpatch_size: Sequence[int] | int = 128,
        channels: Sequence[int] = (32, 64, 128),
        num_res_layers: int = 1,
        embedding_dim: int = 768,
        num_embeddings: int = 512,
        commitment_cost: float = 0.25,
    ) -> None:
        super().__init__(in_channels, superpatch_size)
        self.autoencoder = VQVAE(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=in_channels,
            channels=tuple(channels),
            num_res_layers=num_res_layers,
            num_res_channels=tuple(channels),
            downsample_parameters=((2, 4, 1, 1),) * 3,
            upsample_parameters=((2, 4, 1, 1, 0),) * 3,
            embedding_dim=embedding_dim,
            num_embeddings=num_embeddings,
            commitment_cost=commitment_cost,
            ddp_sync=torch.distributed.is_available() and torch.distributed.is_initialized(),
        )

    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        self._check(image)
        return self.autoencoder(image)[0]

    def forward(self, image: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self._check(image)
        pred, quantisation_loss = self.autoencoder(image)
        mse = _reconstruction_mse(pred, image, valid)
        return {"loss": mse + quantisation_loss, "pred": pred, "mse": mse, "quantisation": quantisation_loss}


BASELINES: dict[str, type[_ReconstructionBaseline]] = {"ae": ConvAutoEncoder, "vae": ConvVAE, "vqvae": ConvVQVAE}


def build_baseline(
    name: str,
    in_channels: int = 1,
    superpatch_size: Sequence[int] | int = 128,
    latent_channels: int = 768,
    vae_latent_size: int = 1024,
    channels: Sequence[int] = (32, 64),
) -> _ReconstructionBaseline:
    """A baseline by name: "ae", "vae" or "vqvae".

    ``channels`` are the widths of the first two stride-2 stages; the AE's third stage and the
    VQ-VAE's code width are ``latent_channels`` (latent grid superpatch_size / 8); the VAE adds
    a fourth stage 16 wide before its flat latent vector of ``vae_latent_size``.
    """
    first, second = channels
    if name == "ae":
        return ConvAutoEncoder(in_channels, superpatch_size, channels=(first, second, latent_channels))
    if name == "vae":
        return ConvVAE(in_channels, superpatch_size, latent_size=vae_latent_size, channels=(first, second, second, 16))
    if name == "vqvae":
        return ConvVQVAE(in_channels, superpatch_size, channels=(first, second, 2 * second), embedding_dim=latent_channels)
    raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")


def build_baselines(names: Sequence[str], **kwargs) -> dict[str, _ReconstructionBaseline]:
    """{name: build_baseline(name, **kwargs)} for each name, in order (for configs)."""
    return {name: build_baseline(name, **kwargs) for name in names}


# ---- whole-volume reconstruction comparison ----------------------------------------------------


def _load_weights(network: nn.Module, path: str | os.PathLike, hint: str) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}: {hint}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise RuntimeError(f"weights in {path} do not fit the configured network ({error}); {hint}") from error


def _scan_name(image: torch.Tensor, index: int) -> str:
    source = getattr(image, "meta", {}).get("filename_or_obj", "")
    name = Path(str(source)).name if source else f"scan_{index:03d}"
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".gz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def evaluate_reconstructions(
    networks: Mapping[str, nn.Module],
    dataset: Sequence[Mapping[str, torch.Tensor]],
    superpatch_size: Sequence[int] | int,
    output_dir: str | os.PathLike,
    checkpoints: Mapping[str, str] | None = None,
    masked: Sequence[str] = (),
    preprocessing: Callable | None = None,
    device: str | torch.device = "cpu",
    superpatch_batch_size: int = 1,
    seed: int = 0,
    hint: str = "train it first",
) -> list[dict]:
    """Reconstruct whole held-out volumes superpatch by superpatch and compare methods.

    Every network runs on each scan's superpatches (padding at the high edges, stitched back
    exactly, so padding reaches no output and no metric); reconstructions are clamped to the
    [0, 1] intensity window. Writes under ``output_dir``:

    - ``reconstructions/<scan>_<method>.nii.gz`` (and ``<scan>_input``): in the input's geometry
      when ``preprocessing`` (the dataset's invertible transform) is given;
    - ``figures/<scan>.png``: axial / coronal / sagittal views, one row per method;
    - ``reconstruction_metrics.csv`` (per scan and mean) and ``reconstruction_metrics.md``.

    Args:
        networks: method name -> network with ``reconstruct(superpatches)``.
        dataset: items with "image" (C, X, Y, Z) in [0, 1] (e.g. a monai Dataset).
        superpatch_size: the networks' input size.
        output_dir: where results go.
        checkpoints: method name -> model.pt to load first (methods left out keep their weights).
        masked: methods also evaluated from dual-masked input (``reconstruct(x, masked=True)``:
            visible tokens copied from the input), reported as "<method>_masked".
        preprocessing: the dataset's transform, used to write outputs in the input geometry.
        device: where the networks run.
        superpatch_batch_size: superpatches per forward pass.
        seed: seed of the masks of the masked evaluation.
        hint: appended to the error when a checkpoint is missing (e.g. the training command).

    Returns:
        one dict per (scan, method): scan, method, inputs_masked, psnr_db, ssim.
    """
    output_dir = Path(output_dir)
    device = torch.device(device)
    for name, path in (checkpoints or {}).items():
        _load_weights(networks[name], path, f"{name}: {hint}")
    unknown = set(masked) - set(networks)
    if unknown:
        raise KeyError(f"masked evaluation asked for {sorted(unknown)}, which are not among the networks {list(networks)}")
    runs = []
    for name, network in networks.items():
        runs.append((name, network, False))
        if name in masked:
            runs.append((f"{name}_masked", network, True))
    for network in networks.values():
        network.to(device).eval()
    rows: list[dict] = []
    for index in range(len(dataset)):
        item = dict(dataset[index])
        image = item["image"]
        scan = _scan_name(image, index)
        volume = torch.as_tensor(image, dtype=torch.float32).unsqueeze(0).to(device)  # (1, C, X, Y, Z)
        panels = {"input": volume[0].cpu()}
        for method, network, inputs_masked in runs:
            generator = torch.Generator(device=device).manual_seed(seed)

            def run(superpatches: torch.Tensor) -> torch.Tensor:
                if inputs_masked:
                    return network.reconstruct(superpatches, masked=True, generator=generator)
                return network.reconstruct(superpatches)

            with torch.no_grad():
                reconstruction = reconstruct_volume(run, volume, superpatch_size, superpatch_batch_size).clamp(0, 1)
            rows.append(
                {
                    "scan": scan,
                    "method": method,
                    "inputs_masked": inputs_masked,
                    "psnr_db": float(psnr(reconstruction, volume)[0]),
                    "ssim": float(ssim3d(reconstruction, volume)[0]),
                }
            )
            panels[method] = reconstruction[0].cpu()
            logger.info("%s %s: PSNR %.2f dB, SSIM %.4f", scan, method, rows[-1]["psnr_db"], rows[-1]["ssim"])
        _write_volumes(item, scan, panels, preprocessing, output_dir / "reconstructions")
        orthogonal_views(panels, output_dir / "figures" / f"{scan}.png", title=f"{scan}: input and reconstructions")
    _write_tables(rows, output_dir)
    return rows


def _write_volumes(
    item: dict, scan: str, panels: Mapping[str, torch.Tensor], preprocessing: Callable | None, folder: Path
) -> None:
    """Write every panel as ``<folder>/<scan>_<name>.nii.gz``, back in the input's geometry when possible."""
    image = item["image"]
    data = {"image": image} | dict(panels)
    if preprocessing is not None and isinstance(image, MetaTensor):
        data = Invertd(keys=list(panels), transform=preprocessing, orig_keys="image", nearest_interp=False)(data)
    writer = SaveImage(output_dtype=np.float32, resample=False, print_log=False)
    folder.mkdir(parents=True, exist_ok=True)
    for name in panels:
        volume = data[name]
        if not isinstance(volume, MetaTensor):
            volume = MetaTensor(volume, meta=dict(getattr(image, "meta", {})))
        writer(volume, filename=folder / f"{scan}_{name}")


def _write_tables(rows: list[dict], output_dir: Path) -> None:
    """reconstruction_metrics.csv (per scan, then the mean per method) and a Markdown summary."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    means = []
    for method in methods:
        own = [row for row in rows if row["method"] == method]
        means.append(
            {
                "scan": "mean",
                "method": method,
                "inputs_masked": own[0]["inputs_masked"],
                "psnr_db": float(np.mean([row["psnr_db"] for row in own])),
                "ssim": float(np.mean([row["ssim"] for row in own])),
                "scans": len(own),
            }
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "reconstruction_metrics.csv", "w", newline="") as stream:
        table = csv.DictWriter(stream, fieldnames=["scan", "method", "inputs_masked", "psnr_db", "ssim"])
        table.writeheader()
        for row in rows + means:
            table.writerow({key: row[key] for key in table.fieldnames})
    lines = [
        "| method | inputs masked at evaluation | PSNR (dB) | SSIM | scans |",
        "|---|---|---|---|---|",
    ]
    for row in means:
        masked = "yes (dual mask; visible tokens copied from the input)" if row["inputs_masked"] else "no"
        lines.append(f"| {row['method']} | {masked} | {row['psnr_db']:.2f} | {row['ssim']:.4f} | {row['scans']} |")
    lines += [
        "",
        "PSNR (data range 1) and 3D SSIM (Gaussian window 11, sigma 1.5) on whole held-out volumes in the [0, 1] "
        "intensity window (HU [-175, 250]); reconstructions stitched from superpatches and clamped to [0, 1]; "
        "padding excluded. LPIPS is not reported: it needs network weights downloaded at run time.",
    ]
    (output_dir / "reconstruction_metrics.md").write_text("\n".join(lines) + "\n")
    logger.info("reconstruction metrics written to %s:\n%s", output_dir / "reconstruction_metrics.csv", "\n".join(lines))
