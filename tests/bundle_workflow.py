"""Build a bundle's ConfigWorkflow the way the model zoo's CI does, and check its metadata."""

import json
from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow, verify_metadata

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "monai" / "meta_schema_20240725.json"


def bundle_workflow(bundle: str, root: Path, *extra_configs: str, **overrides) -> ConfigWorkflow:
    """train.json + demo.json (+ extra configs) of ``bundles/<bundle>``, writing under ``root``."""
    configs = BUNDLES / bundle / "configs"
    return ConfigWorkflow(
        config_file=[str(configs / f"{name}.json") for name in ("train", "demo", *extra_configs)],
        meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"),
        workflow_type="train",
        bundle_root=str(root),
        **overrides,
    )


def repeated_validation_metrics(flow: ConfigWorkflow) -> tuple[dict, dict]:
    """The metrics of two runs of the bundle's ``validate#evaluator`` on the same weights.

    A bundle whose validation draws its crops and masks from fixed seeds gives the same metrics
    twice; one that continues its random streams gives other crops the second time.
    """
    flow.initialize()
    evaluator = flow.parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    first = dict(evaluator.state.metrics)
    evaluator.run()
    return first, dict(evaluator.state.metrics)


def check_metadata_against_schema(bundle: str) -> dict:
    """Validate metadata.json with MONAI's verify_metadata against the official schema copy."""
    if not SCHEMA.is_file():
        pytest.skip(f"official schema not found at {SCHEMA}")
    metadata = BUNDLES / bundle / "configs" / "metadata.json"
    verify_metadata(meta_file=str(metadata), filepath=str(SCHEMA))
    return json.loads(metadata.read_text())
