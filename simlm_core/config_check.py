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


def coerce_cli_strings(config: dict[str, Any], validator: jsonschema.protocols.Validator) -> None:
    """Give command-line values their YAML types where the schema wants a non-string.

    Snakemake parses nested ``--config key="{a: 1.1}"`` values as plain strings; without this a
    documented override like ``bm25="{k1: 1.1}"`` would fail validation. Only values that fail
    a type or enum check, and that parse (as YAML) into something the schema accepts, are
    converted (``encode="{packed: false}"``: the enum holds ``auto`` and the booleans).
    """
    for _ in range(100):  # each pass fixes at least one value; a bound guards against loops
        changed = False
        for error in validator.iter_errors(config):
            if (error.validator not in ("type", "enum") or not isinstance(error.instance, str)
                    or not error.absolute_path):
                continue
            parsed = yaml.safe_load(error.instance)
            if isinstance(parsed, str) or not validator.evolve(schema=error.schema).is_valid(parsed):
                continue
            *parents, leaf = error.absolute_path
            node = config
            for key in parents:
                node = node[key]
            node[leaf] = parsed
            changed = True
        if not changed:
            return


def check_config(config: dict[str, Any], schema_path: str | Path) -> None:
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    coerce_cli_strings(config, validator)
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    if not errors:
        return
    first = errors[0]
    where = ".".join(str(p) for p in first.absolute_path) or "(top level)"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    raise ConfigError(f"config key '{where}': {first.message}{more}")
