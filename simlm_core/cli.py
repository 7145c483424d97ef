"""Turn a dataclass of arguments into a command line: ``--args-json '{...}'`` or ``--args-file f.json``.

Rules pass a stage's config section as one JSON string, so a changed parameter changes the
command line (a Snakemake rerun trigger) and drivers need no per-flag plumbing. Unknown keys are
an error, never silently ignored.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import typing
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], values: dict[str, Any], source: str = "arguments") -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    missing = [
        n for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{source}: missing required key(s) {missing} for {cls.__name__}")
    return cls(**values)


def parse_dataclass_cli(cls: type[T], argv: Sequence[str] | None = None, description: str = "") -> T:
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--args-json", help="the arguments as one JSON object")
    group.add_argument("--args-file", help="a JSON file holding the arguments")
    parser.add_argument("--runtime-json", default="{}",
                        help="more arguments that do not change the result (logging, checkpoint cadence); "
                             "the workflow keeps them apart so that changing one reruns nothing")
    ns = parser.parse_args(argv)
    if ns.args_json is not None:
        values, source = json.loads(ns.args_json), "--args-json"
    else:
        with open(ns.args_file) as f:
            values, source = json.load(f), ns.args_file
    runtime = json.loads(ns.runtime_json)
    both = sorted(set(values) & set(runtime))
    if both:
        raise ValueError(f"key(s) {both} given both in {source} and --runtime-json")
    return dataclass_from_dict(cls, {**values, **runtime}, f"{source} / --runtime-json" if runtime else source)


def run_training_cli(cls: type[T], train: Callable[[T], dict], argv: Sequence[str] | None = None) -> dict:
    """A training driver's main: log to stderr, parse the arguments, train, print the result as JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train(parse_dataclass_cli(cls, argv))
    print(json.dumps(result, default=str))
    return result


def dataclass_field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


__all__ = ["dataclass_from_dict", "parse_dataclass_cli", "run_training_cli", "dataclass_field_names", "typing"]
