"""Pretrained encoders in and out of MONAI bundles: exact loading and zoo archives.

Loading: a pretraining bundle's ``models/model.pt`` is the flat state dict of its whole network
with the encoder under ``encoder.``. :func:`load_pretrained_encoder` fetches it through MONAI's
bundle API (``monai.bundle.load``, ``monai.bundle.download``; offline when the bundle is already
in ``bundle_dir``), copies the ``encoder.`` tensors into the segmentation network under
:data:`medssl.encoders.SEGMENTATION_PREFIX` and reports exactly what it copied. Anything less
than every encoder tensor, or any shape mismatch, is an :class:`EncoderMismatchError` that lists
the offending keys (MONAI's ``copy_model_state`` alone skips mismatches silently).

Archives: :func:`pack_bundle` writes ``<name>_v<version>.zip`` (one top-level ``<name>/``
folder, as ``monai.bundle.download(url=...)`` expects) and its sha256, publishes the weights
beside it and lists them, with their sha256, in the archive's ``large_files.yml`` (so MONAI's
``download_large_files`` fetches and checks them); :func:`verify_archive` refuses an archive whose
sha256 differs or whose members would land outside that folder; :func:`verify_large_files`
refuses weights whose sha256 differs from the one ``large_files.yml`` lists.

Command line (``make zoo``)::

    python -m medssl.zoo pack --bundles bundles/hiend_mae bundles/seg_finetune --out zoo \
        [--schema meta_schema_20240725.json] [--weights-url https://host/path/] [--no-weights]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import stat
import sys
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import torch
import torch.nn as nn
import yaml
from monai.apps.utils import check_hash, download_url
from monai.bundle import download as bundle_download
from monai.bundle import load as bundle_load
from monai.bundle import verify_metadata

from medssl.encoders import SEGMENTATION_PREFIX

__all__ = [
    "ENCODER_KEY_PREFIX",
    "ENCODER_SUBMODULES",
    "EncoderLoadReport",
    "EncoderMismatchError",
    "ArchiveIntegrityError",
    "read_pretrained_state",
    "copy_encoder_weights",
    "encoder_state",
    "load_pretrained_encoder",
    "pack_bundle",
    "verify_archive",
    "verify_large_files",
    "file_sha256",
    "main",
]

logger = logging.getLogger(__name__)

# Pretraining networks hold their encoder as attribute ``encoder``.
ENCODER_KEY_PREFIX = "encoder."

# The top-level modules of each MONAI segmentation network that make up its encoder.
ENCODER_SUBMODULES: dict[str, tuple[str, ...]] = {
    "vit": ("vit",),  # UNETR
    "swin": ("swinViT",),  # SwinUNETR
    "cnn": ("convInit", "down_layers"),  # SegResNet
}

# Folders never packed into an archive: caches, run outputs and local data.
PACK_SKIPPED_FOLDERS = frozenset({"__pycache__", "eval", "data", ".cache", ".pytest_cache"})
# The only files of models/ an archive carries: the weights and their TorchScript export.
PACKED_WEIGHT_FILES = ("model.pt", "model.ts")
LARGE_FILES_NAME = "large_files.yml"
# Fixed member timestamps make the archive (and its sha256) depend on the contents only.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

_REPORT_KEY_LIMIT = 20


class EncoderMismatchError(ValueError):
    """The pretrained encoder does not fit the network; ``report`` holds every offending key."""

    def __init__(self, message: str, report: EncoderLoadReport) -> None:
        super().__init__(message)
        self.report = report


class ArchiveIntegrityError(ValueError):
    """A zoo archive whose checksum or member paths cannot be trusted."""


@dataclass
class EncoderLoadReport:
    """What :func:`copy_encoder_weights` did.

    ``expected`` counts the encoder tensors of the network; ``copied`` lists the network keys
    that received a pretrained tensor; ``missing`` are network encoder keys without one;
    ``unexpected`` pretrained encoder keys the network has no place for; ``mismatched`` keys
    present on both sides with different shapes (as "key: pretrained shape vs network shape").
    """

    source: str
    kind: str
    target_prefix: str
    expected: int
    copied: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.copied) == self.expected and not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        where = f"network.{self.target_prefix}" if self.target_prefix else "network (encoder modules)"
        return (
            f"copied {len(self.copied)} of {self.expected} {self.kind} encoder tensors from {self.source} "
            f"into {where}"
        )

    def problems(self, limit: int = _REPORT_KEY_LIMIT) -> str:
        lines = []
        for title, keys in (
            ("shape mismatch", self.mismatched),
            ("missing from the pretrained weights", self.missing),
            ("not in the network", self.unexpected),
        ):
            if keys:
                shown = "\n    ".join(keys[:limit])
                more = f"\n    ... and {len(keys) - limit} more (EncoderMismatchError.report)" if len(keys) > limit else ""
                lines.append(f"  {title} ({len(keys)}):\n    {shown}{more}")
        return "\n".join(lines)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _StateDictReceiver(nn.Module):
    """A module with no weights of its own that keeps the state dict handed to load_state_dict.

    ``monai.bundle.load`` builds the other bundle's ``network_def`` (running its configs) when no
    model is given; handing it this receiver instead makes it fetch and ``torch.load`` the
    weights (weights_only) and pass every tensor through unchanged, so nothing of the
    pretraining bundle's code runs here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.received: dict[str, torch.Tensor] = {}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        self.received = dict(state_dict)
        return nn.modules.module._IncompatibleKeys([], [])


def _keep_every_tensor(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    return key, value


def _default_bundle_dir() -> Path:
    return Path(torch.hub.get_dir()) / "bundle"


def _local_path_of(url: str) -> Path | None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.netloc + parsed.path))
    if parsed.scheme == "" and Path(url).is_file():
        return Path(url)
    return None


def verify_archive(archive: str | os.PathLike, sha256: str) -> str:
    """Check a zoo archive before anything is extracted; return its bundle name.

    Refuses (:class:`ArchiveIntegrityError`) an archive whose sha256 is not ``sha256``, and one
    whose members are not all relative paths inside a single top-level ``<name>/`` folder (no
    absolute path, no ``..``, no symbolic link).
    """
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"zoo archive {archive} does not exist")
    if not sha256:
        raise ArchiveIntegrityError(
            f"no sha256 given for {archive} (pretrained#sha256): pass the checksum pack_bundle returned (also in "
            f"{archive.name}.sha256 next to the archive when it was packed) so it can be verified before extraction"
        )
    actual = file_sha256(archive)
    if actual != sha256.strip().lower():
        raise ArchiveIntegrityError(
            f"zoo archive {archive} has sha256 {actual} but {sha256.strip()} was expected: it was changed or "
            "corrupted after packing. Do not use it; fetch or pack it again."
        )
    top_levels = set()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            path = PurePosixPath(member.filename.replace("\\", "/"))
            mode = member.external_attr >> 16
            if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
                raise ArchiveIntegrityError(
                    f"zoo archive {archive} has member {member.filename!r} whose path escapes the bundle folder; refused"
                )
            if stat.S_ISLNK(mode):
                raise ArchiveIntegrityError(f"zoo archive {archive} has symbolic link {member.filename!r}; refused")
            if len(path.parts) < 2 and not member.is_dir():
                raise ArchiveIntegrityError(
                    f"zoo archive {archive} has file {member.filename!r} outside a top-level bundle folder; a zoo "
                    "archive holds everything under <name>/ (pack it with medssl.zoo.pack_bundle)"
                )
            top_levels.add(path.parts[0])
    if len(top_levels) != 1:
        raise ArchiveIntegrityError(
            f"zoo archive {archive} must hold exactly one top-level bundle folder, found {sorted(top_levels)}"
        )
    return top_levels.pop()


def verify_large_files(bundle_root: str | os.PathLike, paths: list[str] | None = None) -> list[str]:
    """Check a bundle's weight files against the hashes its ``large_files.yml`` lists.

    Args:
        bundle_root: the bundle folder.
        paths: bundle-relative paths to check (e.g. ``["models/model.pt"]``); None checks every
            listed file.

    Returns:
        the paths whose hash was checked and matched. Entries without a ``hash_val`` (an
        unpublished bundle), files not present and a bundle without ``large_files.yml`` are not
        checked: there is nothing to compare with.

    Raises:
        ArchiveIntegrityError: a present file whose hash differs from the listed one.
    """
    bundle_root = Path(bundle_root)
    listing = bundle_root / LARGE_FILES_NAME
    if not listing.is_file():
        return []
    entries = (yaml.safe_load(listing.read_text()) or {}).get("large_files") or []
    checked = []
    for entry in entries:
        relative = PurePosixPath(str(entry.get("path", "")))
        hash_val, hash_type = str(entry.get("hash_val") or ""), str(entry.get("hash_type") or "sha256")
        file = bundle_root / relative
        if not hash_val or (paths is not None and relative.as_posix() not in paths) or not file.is_file():
            continue
        if not check_hash(file, hash_val, hash_type):
            raise ArchiveIntegrityError(
                f"{file} does not have the {hash_type} {hash_val} that {listing} lists: the weights were changed or "
                f"corrupted after packing. Do not use them: delete {file} and run `python -m monai.bundle "
                f"download_large_files --bundle_path {bundle_root}` (or extract the zoo archive again)."
            )
        checked.append(relative.as_posix())
    return checked


def _check_extracted_matches(archive: Path, bundle_root: Path, model_file: str) -> None:
    """monai.bundle.download keeps an existing folder: make sure it is this archive's bundle."""
    name = bundle_root.name
    member = f"{name}/{PurePosixPath(model_file).as_posix()}"
    with zipfile.ZipFile(archive) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise FileNotFoundError(
                f"zoo archive {archive} has no {member}: it was packed without weights (include_weights=False)"
            ) from None
    extracted = bundle_root / model_file
    crc = 0
    with open(extracted, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    if crc != info.CRC or extracted.stat().st_size != info.file_size:
        raise ArchiveIntegrityError(
            f"{extracted} differs from {member} in {archive}: monai.bundle.download keeps an existing bundle folder "
            f"instead of extracting over it. Extract into another folder (pretrained#bundle_dir), or delete "
            f"{bundle_root} if it is an earlier extraction of this bundle, and load again."
        )


def read_pretrained_state(
    bundle_name: str | None = None,
    bundle_dir: str | os.PathLike | None = None,
    source: str = "monaihosting",
    version: str | None = None,
    url: str | None = None,
    sha256: str | None = None,
    model_path: str | os.PathLike | None = None,
    model_file: str = "models/model.pt",
    key_in_ckpt: str | None = None,
) -> tuple[dict[str, torch.Tensor], str] | None:
    """The pretrained state dict (on CPU) and a description of where it came from.

    Exactly one way of naming the source:
        - ``model_path``: a plain ``model.pt`` file;
        - ``url`` (+ ``sha256``): a zoo archive (``file://...zip`` offline), verified, then
          extracted into ``bundle_dir`` by ``monai.bundle.download``;
        - ``bundle_name`` (+ ``bundle_dir``, ``source``, ``version``): a bundle in
          ``bundle_dir/bundle_name`` (no download), else downloaded from ``source``.
    All of them None: returns None (training from scratch).
    """
    if model_path and (url or bundle_name):
        raise ValueError(
            f"name the pretrained source one way: model_path {model_path} or a bundle (bundle_name {bundle_name!r}, "
            f"url {url!r}), not both"
        )
    if model_path:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights {path} do not exist (pretrained#model_path)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        return (state[key_in_ckpt] if key_in_ckpt else state), str(path)
    if not url and not bundle_name:
        return None

    bundle_dir = Path(bundle_dir) if bundle_dir else _default_bundle_dir()
    if url:
        archive = _local_path_of(url)
        if archive is None:  # remote archive: MONAI fetches it and checks the sha256 on arrival
            bundle_dir.mkdir(parents=True, exist_ok=True)
            archive = bundle_dir / PurePosixPath(urlparse(url).path).name
            download_url(url, archive, hash_val=sha256, hash_type="sha256", progress=False)
        name = verify_archive(archive, sha256 or "")
        if bundle_name and bundle_name != name:
            raise ValueError(f"zoo archive {archive} holds bundle {name!r}, not {bundle_name!r} (pretrained#bundle_name)")
        with warnings.catch_warnings():  # MONAI warns that it checks no hash: verify_archive just did
            warnings.filterwarnings("ignore", message="No hash value provided")
            bundle_download(name=name, bundle_dir=str(bundle_dir), url=archive.resolve().as_uri(), progress=False)
        _check_extracted_matches(archive, bundle_dir / name, model_file)
        bundle_name = name

    local = bundle_dir / bundle_name / model_file
    model_key = PurePosixPath(model_file).as_posix()
    downloading = not local.is_file()
    if downloading:
        logger.info("%s is not there: downloading bundle %r from %s", local, bundle_name, source)
    else:
        verify_large_files(bundle_dir / bundle_name, [model_key])
    receiver = _StateDictReceiver()
    try:
        bundle_load(
            name=bundle_name,
            model=receiver,
            version=version,
            model_file=model_file,
            bundle_dir=str(bundle_dir),
            source=source,
            device="cpu",
            key_in_ckpt=key_in_ckpt,
            progress=False,
            copy_model_args={"filter_func": _keep_every_tensor},
        )
    except Exception as error:
        if local.is_file():
            raise
        raise RuntimeError(
            f"pretrained bundle {bundle_name!r} is not at {local} and could not be downloaded from {source!r} "
            f"({type(error).__name__}: {error}). Put the bundle folder in {bundle_dir} (pretrained#bundle_dir), "
            "or name a zoo archive with pretrained#url and pretrained#sha256."
        ) from error
    if downloading:
        verify_large_files(bundle_dir / bundle_name, [model_key])
    return receiver.received, str(local)


def _encoder_keys(network: nn.Module, kind: str) -> set[str]:
    roots = tuple(f"{name}." for name in ENCODER_SUBMODULES[kind])
    return {key for key in network.state_dict() if key.startswith(roots)}


def encoder_state(network: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """The encoder tensors of a segmentation network in a pretraining state dict's naming (under ``encoder.``).

    The inverse of :func:`copy_encoder_weights`: what it returns loads back, strictly, into any
    network built with the same settings.
    """
    network = getattr(network, "module", network)
    prefix = SEGMENTATION_PREFIX[kind]
    state = network.state_dict()
    return {ENCODER_KEY_PREFIX + key[len(prefix):]: state[key] for key in sorted(_encoder_keys(network, kind))}


def copy_encoder_weights(
    network: nn.Module,
    kind: str,
    state: dict[str, torch.Tensor],
    source: str = "state dict",
    strict: bool = True,
) -> EncoderLoadReport:
    """Copy the ``encoder.`` tensors of a pretraining state dict into a segmentation network.

    Args:
        network: UNETR / SwinUNETR / SegResNet from ``build_segmentation_network(kind, ...)``
            (a DistributedDataParallel wrapper is unwrapped).
        kind: "vit", "swin" or "cnn".
        state: flat state dict of a pretraining network (encoder under ``encoder.``).
        source: where ``state`` came from, for the report.
        strict: raise :class:`EncoderMismatchError` unless every encoder tensor of the network
            gets a pretrained tensor of the same shape and every pretrained one is used; with
            False the fitting tensors are copied and the rest logged as warnings.

    Returns:
        the :class:`EncoderLoadReport`.
    """
    if kind not in SEGMENTATION_PREFIX:
        raise ValueError(f"unknown encoder kind {kind!r}; choose one of {sorted(SEGMENTATION_PREFIX)}")
    network = getattr(network, "module", network)
    prefix = SEGMENTATION_PREFIX[kind]
    pretrained = {key[len(ENCODER_KEY_PREFIX):]: value for key, value in state.items() if key.startswith(ENCODER_KEY_PREFIX)}
    if not pretrained:
        sample = ", ".join(list(state)[:5])
        raise EncoderMismatchError(
            f"{source} has no tensor under {ENCODER_KEY_PREFIX!r} (its keys start: {sample}): name the models/model.pt "
            "of a pretraining bundle, whose network holds its encoder as attribute `encoder`",
            EncoderLoadReport(source, kind, prefix, expected=len(_encoder_keys(network, kind))),
        )
    target = network.state_dict()
    encoder_keys = _encoder_keys(network, kind)
    report = EncoderLoadReport(source, kind, prefix, expected=len(encoder_keys))
    to_copy = {}
    for key, value in pretrained.items():
        network_key = prefix + key
        if network_key not in encoder_keys:
            report.unexpected.append(ENCODER_KEY_PREFIX + key)
        elif target[network_key].shape != value.shape:
            report.mismatched.append(
                f"{ENCODER_KEY_PREFIX}{key}: pretrained {tuple(value.shape)} vs network {tuple(target[network_key].shape)}"
            )
        else:
            to_copy[network_key] = value
    report.missing = sorted(key for key in encoder_keys if key[len(prefix):] not in pretrained)
    report.copied = sorted(to_copy)
    if not report.complete:
        message = f"{report.summary()}:\n{report.problems()}"
        if strict:
            raise EncoderMismatchError(
                f"{message}\nThe encoder kind/size/img_size of this network must match the pretraining bundle's "
                "(network_kind, encoder_size, encoder_args, roi_size); set pretrained#strict false only to copy what fits on purpose.",
                report,
            )
        logger.warning(message)
    network.load_state_dict(to_copy, strict=False)
    logger.info(report.summary())
    return report


def load_pretrained_encoder(
    network: nn.Module,
    kind: str,
    bundle_name: str | None = None,
    bundle_dir: str | os.PathLike | None = None,
    source: str = "monaihosting",
    version: str | None = None,
    url: str | None = None,
    sha256: str | None = None,
    model_path: str | os.PathLike | None = None,
    model_file: str = "models/model.pt",
    key_in_ckpt: str | None = None,
    strict: bool = True,
) -> EncoderLoadReport | None:
    """Initialise the encoder of a segmentation network from a pretraining bundle.

    The source is named as in :func:`read_pretrained_state`; with none named the network keeps
    its random initialisation, the log says so and None is returned. Otherwise the copy is
    :func:`copy_encoder_weights` (exact by default) and its report is returned.
    """
    loaded = read_pretrained_state(bundle_name, bundle_dir, source, version, url, sha256, model_path, model_file, key_in_ckpt)
    if loaded is None:
        logger.info("no pretrained source named (pretrained#bundle_name/url/model_path): training from scratch")
        return None
    state, where = loaded
    return copy_encoder_weights(network, kind, state, source=where, strict=strict)


def _packed_files(bundle_dir: Path, include_weights: bool) -> list[Path]:
    files = []
    for path in sorted(bundle_dir.rglob("*")):
        relative = path.relative_to(bundle_dir)
        if not path.is_file() or path.is_symlink() or PACK_SKIPPED_FOLDERS.intersection(relative.parts[:-1]):
            continue
        if path.suffix == ".pyc":
            continue
        if relative.parts[0] == "models" and (not include_weights or relative.as_posix() not in
                                              {f"models/{name}" for name in PACKED_WEIGHT_FILES}):
            continue
        if relative.as_posix() == LARGE_FILES_NAME:  # pack_bundle writes the archive's own
            continue
        files.append(path)
    return files


def _large_files_listing(entries: list[dict[str, str]]) -> bytes:
    return yaml.safe_dump({"large_files": entries}, sort_keys=False).encode()


def pack_bundle(
    bundle_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    include_weights: bool = True,
    weights_url: str | None = None,
) -> tuple[Path, str]:
    """Write a zoo archive of a bundle folder and return (archive path, sha256).

    The archive is ``out_dir/<name>_v<version>.zip`` (name: the folder's name; version:
    ``configs/metadata.json``) with everything under a top-level ``<name>/`` folder; it leaves
    out caches, run outputs and local data (``__pycache__``, ``eval/``, ``data/``, ``.cache``)
    and from ``models/`` carries only ``model.pt`` / ``model.ts`` (none with
    ``include_weights=False``). Member timestamps are fixed, so the same contents give the same
    sha256, which is also written to ``<archive>.sha256`` (``sha256sum -c`` format).

    Weights: each of ``models/model.pt`` / ``models/model.ts`` that exists is also published
    beside the archive, in ``out_dir/<name>_v<version>/models/``, and listed in the archive's
    ``large_files.yml`` with its sha256 and its URL, ``weights_url`` + ``models/<file>``.
    ``weights_url`` is the URL of the folder that will hold the bundle's ``models/`` (``{name}``
    and ``{version}`` are filled in): by default the ``file://`` URL of
    ``out_dir/<name>_v<version>/``; for a hub, where the bundle folder is uploaded, e.g.
    ``https://huggingface.co/ORG/{name}/resolve/{version}/``. A bundle with no weights keeps its
    own ``large_files.yml``.
    """
    bundle_dir = Path(bundle_dir).resolve()
    metadata_file = bundle_dir / "configs" / "metadata.json"
    if not metadata_file.is_file():
        raise FileNotFoundError(f"{metadata_file} is missing: {bundle_dir} is not a MONAI bundle folder")
    version = json.loads(metadata_file.read_text()).get("version")
    if not version:
        raise ValueError(f"{metadata_file} has no 'version'; add one before packing")
    name = bundle_dir.name
    weights = [bundle_dir / "models" / file for file in PACKED_WEIGHT_FILES if (bundle_dir / "models" / file).is_file()]
    if include_weights and bundle_dir / "models" / "model.pt" not in weights:
        raise FileNotFoundError(
            f"{bundle_dir / 'models' / 'model.pt'} does not exist: train the bundle first or pack with include_weights=False"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    published_root = out_dir / f"{name}_v{version}"
    base_url = weights_url.format(name=name, version=version) if weights_url else published_root.resolve().as_uri()
    base_url = base_url.rstrip("/") + "/"
    listed = []
    for weight in weights:
        published = published_root / "models" / weight.name
        published.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weight, published)
        listed.append({"path": f"models/{weight.name}", "url": f"{base_url}models/{weight.name}",
                       "hash_val": file_sha256(published), "hash_type": "sha256"})
        logger.info("published %s as %s (sha256 %s)", weight, listed[-1]["url"], listed[-1]["hash_val"])
    own_listing = bundle_dir / LARGE_FILES_NAME
    members: dict[str, Path | bytes] = {
        f"{name}/{path.relative_to(bundle_dir).as_posix()}": path for path in _packed_files(bundle_dir, include_weights)
    }
    if listed:
        members[f"{name}/{LARGE_FILES_NAME}"] = _large_files_listing(listed)
    elif own_listing.is_file():
        members[f"{name}/{LARGE_FILES_NAME}"] = own_listing
    archive = out_dir / f"{name}_v{version}.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for member in sorted(members):
            info = zipfile.ZipInfo(member, date_time=ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            content = members[member]
            with zf.open(info, "w") as dst:
                if isinstance(content, bytes):
                    dst.write(content)
                else:
                    with open(content, "rb") as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
    digest = file_sha256(archive)
    Path(f"{archive}.sha256").write_text(f"{digest}  {archive.name}\n")
    logger.info("packed %d files of %s into %s (sha256 %s)", len(members), bundle_dir, archive, digest)
    return archive, digest


def main(argv: list[str] | None = None) -> int:
    """``python -m medssl.zoo pack --bundles DIR [DIR ...] --out ZOO``: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m medssl.zoo", description="Model-zoo archives of MONAI bundles.")
    commands = parser.add_subparsers(dest="command", required=True)
    pack = commands.add_parser(
        "pack", help="write each bundle as ZOO/<name>_v<version>.zip (+ .sha256) and publish its weights beside it"
    )
    pack.add_argument("--bundles", nargs="+", type=Path, required=True, help="bundle folders")
    pack.add_argument("--out", type=Path, required=True, help="the zoo folder")
    pack.add_argument(
        "--schema", type=Path, default=None,
        help="metadata schema file (meta_schema_20240725.json): each metadata.json is checked with "
        "monai.bundle.verify_metadata first; without it the check is skipped (MONAI would download the schema)",
    )
    pack.add_argument("--weights-url", default=None,
                      help="URL of the folder that will hold each bundle's models/, {name} and {version} filled in "
                      "(default: file:// URL of OUT/<name>_v<version>/)")
    pack.add_argument("--no-weights", action="store_true",
                      help="leave the weights out of the archives; they are still published beside them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.schema is not None and not args.schema.is_file():
        parser.error(f"--schema {args.schema} does not exist")
    if args.schema is None:
        logger.warning("no --schema given: metadata.json files are not checked against the MONAI schema")
    for bundle in args.bundles:
        metadata_file = bundle / "configs" / "metadata.json"
        try:
            if args.schema is not None:
                verify_metadata(meta_file=str(metadata_file), filepath=str(args.schema))
            trained = (bundle / "models" / "model.pt").is_file()
            if not trained:
                logger.info("%s has no models/model.pt: its archive carries no weights (train the bundle first)", bundle)
            archive, digest = pack_bundle(bundle, args.out, include_weights=trained and not args.no_weights,
                                          weights_url=args.weights_url)
        except (FileNotFoundError, ValueError) as error:
            parser.exit(1, f"medssl.zoo pack: {bundle}: {error}\n")
        print(f"{archive}  sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
