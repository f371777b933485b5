"""Dataset recipes: ready-made params for a known dataset, written into ``params.yaml``.

A recipe (``recipes/NAME.yaml``) holds only the keys that differ from the defaults
for one dataset (where it lives in ``data/sources/``, how its files name a patient,
which splits to keep, the image size). ``tlpipe recipe NAME`` merges it into
``params.yaml`` in place, keeping the file's comments and order, and validates the
result before writing: ``git diff params.yaml`` shows exactly what changed, and
``dvc repro`` reruns what that affects. The same keys work as ``dvc exp run -S``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import shlex
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.scalarstring import SingleQuotedScalarString

from tlpipe.core.config import ConfigError, parse_params
from tlpipe.core.errors import PipelineError
from tlpipe.core.files import atomic_write

logger = logging.getLogger(__name__)

RECIPES_DIR = Path("recipes")


def recipe_names(folder: Path = RECIPES_DIR) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.yaml"))


def recipe_path(name: str, folder: Path = RECIPES_DIR) -> Path:
    """A recipe by name (``kermany``) or by path (``my/recipe.yaml``)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = Path(folder) / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(recipe_names(folder)) or "none"
        raise PipelineError(f"no recipe {name!r} in {folder}/ (recipes: {known}), and no such .yaml file")
    return path


def load_recipe(path: Path) -> dict:
    recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(recipe, dict):
        raise PipelineError(f"{path}: a recipe is a mapping of params sections, got {type(recipe).__name__}")
    return recipe


def settings(recipe: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """The recipe's leaves as (dotted key, value): what ``dvc exp run -S key=value`` would set."""
    for key, value in recipe.items():
        if isinstance(value, Mapping):
            yield from settings(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _scalar(value: Any) -> Any:
    """A string that YAML would read back differently, or that holds regex syntax, single-quoted."""
    if isinstance(value, str) and not re.fullmatch(r"[\w./-]+", value):
        return SingleQuotedScalarString(value)
    if isinstance(value, list):
        return [_scalar(v) for v in value]
    return value


def _set(document: CommentedMap, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = document
    for part in parents:
        if not isinstance(node.get(part), Mapping):
            node[part] = CommentedMap()
        node = node[part]
    node[leaf] = _scalar(value)


def apply_recipe(params_text: str, recipe: Mapping[str, Any], source: str = "params.yaml") -> str:
    """``params_text`` with every key of ``recipe`` set, comments kept; refused if the result is invalid."""
    rt = YAML()  # round-trip: comments, key order and quoting survive
    rt.preserve_quotes = True
    rt.width = 4096  # never fold a long line the user wrote on one
    # null as params.yaml spells it, not as an empty value
    rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    document = rt.load(params_text) or CommentedMap()
    for key, value in settings(recipe):
        _set(document, key, value)
    buffer = io.StringIO()
    rt.dump(document, buffer)
    text = buffer.getvalue()
    try:
        parse_params(yaml.safe_load(text), source=f"{source} with the recipe")
    except ConfigError as err:
        raise PipelineError(f"the recipe does not fit tlpipe's params: {err}") from None
    return text


def _flow(value: Any) -> str:
    """A value as ``dvc exp run -S`` parses it (YAML flow style)."""
    return "null" if value is None else str(value) if isinstance(value, str) else json.dumps(value)


def _summary(path: Path) -> str:
    """A recipe's first comment line: what dataset it is for."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="a recipe in recipes/ (e.g. kermany), or a path to a .yaml")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file to edit")
    parser.add_argument("--list", action="store_true", help="list the recipes and what each is for")
    parser.add_argument(
        "--sets",
        action="store_true",
        help="print the recipe as dvc exp run options (-S key=value ...) instead of editing params.yaml",
    )


def run(args: argparse.Namespace) -> int:
    if args.list or not args.name:
        for name in recipe_names():
            sys.stdout.write(f"{name}: {_summary(recipe_path(name))}\n")
        return 0
    path = recipe_path(args.name)
    recipe = load_recipe(path)
    if args.sets:
        sys.stdout.write(" ".join(f"-S {shlex.quote(f'{k}={_flow(v)}')}" for k, v in settings(recipe)) + "\n")
        return 0
    text = apply_recipe(args.params.read_text(encoding="utf-8"), recipe, str(args.params))
    atomic_write(args.params, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    changed = ", ".join(key for key, _ in settings(recipe))
    logger.info("recipe %s written into %s: %s", path.stem, args.params, changed)
    return 0
