"""Data for the medssl bundles: datalists, CT transform presets, datasets and synthetic phantoms.

Typical use in a bundle (no data given -> the embedded phantom dataset)::

    json_path = default_dataset(bundle_root / "data")
    train, val = split_datalist(load_datalist(json_path), num_val=2, seed=0)
    dataset = build_dataset(train, ct_pretrain_transforms(), cache="cache")

Names are imported on first use, so ``python -m medssl.data.phantoms`` does not load MONAI.
"""

from importlib import import_module

_EXPORTS = {
    "medssl.data.datalists": (
        "datalist_from_decathlon",
        "datalist_from_folder",
        "default_dataset",
        "load_datalist",
        "shard_datalist",
        "split_datalist",
    ),
    "medssl.data.dataset": (
        "CACHE_MODES",
        "CachedScanDataset",
        "PersistentScanDataset",
        "ScanDataset",
        "build_dataset",
        "scan_keys_of",
        "validate_datalist",
    ),
    "medssl.data.phantoms": ("LABELS", "LABEL_IDS", "generate_phantom", "write_phantom_dataset"),
    "medssl.data.scans": (
        "ACCEPTED_SCANS",
        "SCAN_EXTENSIONS",
        "BadScanError",
        "check_scan_array",
        "read_scan_header",
    ),
    "medssl.data.transforms": (
        "CheckScand",
        "LoadScand",
        "SelectLabelsd",
        "ct_infer_transforms",
        "ct_pretrain_transforms",
        "ct_seg_train_transforms",
        "ct_seg_val_transforms",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'medssl.data' has no attribute '{name}'")
    value = getattr(import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
