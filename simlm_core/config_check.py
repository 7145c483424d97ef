"""Validate the workflow config against its JSON schema with one-line errors naming the key.

Snakemake's own ``validate`` prints the whole schema on failure; users need the key and the
problem, before any job runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml


class ConfigError(ValueError):
    pass


def check_config(config: dict[str, Any], schema_path: str | Path) -> None:
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    if not errors:
        return
    first = errors[0]
    where = ".".join(str(p) for p in first.absolute_path) or "(top level)"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    raise ConfigError(f"config key '{where}': {first.message}{more}")
