"""params.yaml validation: every mistake fails fast with a message naming the key and value."""

from __future__ import annotations

import math
import os
import string
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin

import annotated_types
import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from tlpipe.core.config import ConfigError, Params, load_params, parse_params, section_dict
from tlpipe.core.errors import PipelineError

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
SECTIONS = {
    "": ["augment", "data", "evaluate", "fine_tune", "registry", "split", "train_frozen"],
    "registry": ["margin", "metric", "model_name"],
    "augment": [
        "brightness_limit",
        "contrast_limit",
        "copies",
        "crop_scale",
        "horizontal_flip",
        "image_size",
        "probability",
        "rotate_limit",
        "scale_limit",
        "seed",
        "shift_limit",
        "vertical_flip",
    ],
    "data": [
        "channels",
        "classes",
        "csv",
        "demo",
        "folder",
        "max_image_pixels",
        "max_rejected_fraction",
        "medmnist",
        "min_image_size",
        "source",
        "url",
    ],
    "data.demo": ["image_size", "images_per_class", "seed"],
    "data.folder": ["path"],
    "split": [
        "duplicates",
        "group_pattern",
        "seed",
        "source_split_overlap",
        "source_splits",
        "test_fraction",
        "val_fraction",
    ],
    "evaluate": [
        "batch_size",
        "bootstrap_resamples",
        "calibration",
        "calibration_bins",
        "ci_level",
        "decision_data",
        "fixed_threshold",
        "guard_accept",
        "guard_fit_images",
        "operating_sensitivities",
        "seed",
        "target_sensitivity",
        "threshold",
        "top_k",
    ],
}


def _nest(dotted: str, value: object) -> dict:
    """{"a.b.c": v} -> {"a": {"b": {"c": v}}}"""
    *parents, leaf = dotted.split(".")
    raw: dict = {leaf: value}
    for part in reversed(parents):
        raw = {part: raw}
    return raw


def _error(raw: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    return str(info.value)


def test_repo_params_yaml_validates_and_is_read_not_defaulted():
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    params = load_params(REPO_PARAMS)
    # values that differ from the schema defaults prove the file was actually read
    assert params.augment.image_size == raw["augment"]["image_size"]
    assert params.train_frozen.epochs == raw["train_frozen"]["epochs"]
    assert params.data.demo.images_per_class == raw["data"]["demo"]["images_per_class"]
    assert params.model_dump() == parse_params(raw).model_dump()


@pytest.mark.parametrize("raw", [None, {}], ids=["empty-file", "empty-mapping"])
def test_defaults_validate(raw):
    params = parse_params(raw)
    assert params == Params()
    assert params.data.source == "demo"
    assert params.split.val_fraction + params.split.test_fraction < 0.9


def test_partial_section_keeps_other_defaults():
    params = parse_params({"augment": {"copies": 0}})
    assert params.augment.copies == 0
    assert params.augment.image_size == Params().augment.image_size


@pytest.mark.parametrize(
    ("dotted", "section"),
    [
        ("augmnt", ""),
        ("augment.flipp", "augment"),
        ("data.demo.size", "data.demo"),
        ("data.folder.root", "data.folder"),
        ("split.seeds", "split"),
        ("evaluate.batchsize", "evaluate"),
    ],
)
def test_unknown_key_is_named_with_allowed_keys(dotted, section):
    message = _error(_nest(dotted, 1))
    assert f"{dotted}: unknown key; allowed keys here: {', '.join(SECTIONS[section])}" in message


@pytest.mark.parametrize(
    ("dotted", "value", "hint"),
    [
        ("train_frozen.epochs", "ten", "valid integer"),
        ("split.test_fraction", 1.5, "less than 1"),
        ("split.val_fraction", 0.0, "greater than 0"),
        ("augment.image_size", 8, "greater than or equal to 32"),
        ("augment.horizontal_flip", 2, "less than or equal to 1"),
        ("augment.copies", -1, "greater than or equal to 0"),
        ("data.demo.images_per_class", 2, "greater than or equal to 4"),
        ("fine_tune.learning_rate", 0, "greater than 0"),
        ("train_frozen.backbone", "resnet9000", "efficientnet_lite0"),
        ("fine_tune.optimizer", "adagrad", "adamw"),
        ("fine_tune.schedule", "linear", "cosine"),
        ("train_frozen.class_weight", "yes", "balanced"),
        ("fine_tune.label_smoothing", 0.5, "less than 0.5"),
        ("fine_tune.backbone_lr_factor", 2, "less than or equal to 1"),
        ("train_frozen.distribution", "tpu", "multi_worker"),
        ("data.classes", "cats", "valid list"),
    ],
)
def test_bad_value_names_key_and_value(dotted, value, hint):
    message = _error(_nest(dotted, value))
    line = next(ln for ln in message.splitlines() if ln.strip().startswith(f"{dotted}:"))
    assert f"(got {value!r})" in line
    assert hint in line


@pytest.mark.parametrize(
    ("dotted", "value"),
    [("train_frozen.epochs", True), ("split.seed", False), ("augment.rotate_limit", True)],
)
def test_boolean_is_not_a_number(dotted, value):
    # YAML reads `epochs: yes` / `on` as True; pydantic alone would take it as epochs=1
    message = _error(_nest(dotted, value))
    assert f"{dotted}:" in message
    assert f"(got {value!r})" in message


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_are_rejected(value):
    message = _error({"train_frozen": {"learning_rate": value}})
    assert "train_frozen.learning_rate:" in message


def test_numeric_string_is_accepted():
    # PyYAML reads `1e-3` (no dot) as a string: it must still work as a float
    assert parse_params({"train_frozen": {"learning_rate": "1e-3"}}).train_frozen.learning_rate == 0.001


def test_several_errors_are_all_reported():
    message = _error({"augment": {"flipp": 1, "copies": "two"}, "split": {"test_fraction": 2}})
    assert message.splitlines()[0].endswith("3 invalid setting(s):")
    for key in ("augment.flipp", "augment.copies", "split.test_fraction"):
        assert f"{key}:" in message


def test_folder_source_needs_path():
    message = _error({"data": {"source": "folder"}})
    assert "data.folder.path is not set" in message
    folder = parse_params({"data": {"source": "folder", "folder": {"path": "data/sources/xrays"}}})
    assert folder.data.folder.path == "data/sources/xrays"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"source": "folder", "folder": {"path": "/data/chest_xray"}}, "data.folder.path"),
        ({"source": "folder", "folder": {"path": "../chest_xray"}}, "data.folder.path"),
        ({"source": "folder", "folder": {"path": "data/sources/../../x"}}, "data.folder.path"),
        ({"source": "folder", "folder": {"path": "data/sources"}}, "data.folder.path"),
        ({"source": "folder", "folder": {"path": "data/raw"}}, "data.folder.path"),
        ({"source": "csv", "csv": {"images": ["data/sources/a", "/tmp/b"], "file": "data/sources/m.csv"}},
         "data.csv.images"),
        ({"source": "csv", "csv": {"images": "data/sources/a", "file": "m.csv"}}, "data.csv.file"),
        ({"source": "medmnist", "medmnist": {"path": "/tmp/pneumoniamnist.npz"}}, "data.medmnist.path"),
    ],
)  # fmt: skip
def test_local_source_outside_data_sources_is_refused_with_the_way_in(data, key):
    message = _error({"data": data})
    assert f"{key} is " in message
    assert "must be a relative path inside data/sources/" in message
    assert "dvc add" in message and "--out data/sources/" in message


def test_paths_of_sources_not_in_use_are_not_checked():
    params = parse_params({"data": {"source": "demo", "folder": {"path": "/elsewhere"}}})
    assert params.data.folder.path == "/elsewhere"


def test_unknown_source_lists_allowed_values():
    message = _error({"data": {"source": "s3"}})
    assert "data.source:" in message
    assert "'s3'" in message
    assert "'demo'" in message and "'folder'" in message


@pytest.mark.parametrize(
    ("classes", "hint"),
    [(["a", "b", "a"], "duplicates"), ([], "at least 2"), (["only"], "at least 2")],
)
def test_bad_class_list(classes, hint):
    message = _error({"data": {"classes": classes}})
    assert "data.classes" in message
    assert hint in message


def test_split_fractions_must_leave_training_data():
    message = _error({"split": {"val_fraction": 0.5, "test_fraction": 0.45}})
    assert "split.val_fraction + split.test_fraction must be < 0.9" in message
    assert "0.5 + 0.45" in message


@pytest.mark.parametrize("raw", [[1, 2], "just a string", 3])
def test_non_mapping_top_level(raw):
    message = _error(raw)
    assert "expected a mapping at the top level" in message
    assert type(raw).__name__ in message


def test_config_error_is_a_pipeline_error():
    # stage scripts print PipelineErrors as one clear line: a bad params file must be one
    assert issubclass(ConfigError, PipelineError)


def test_load_params_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="no such file") as info:
        load_params(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("content", "hint"),
    [
        ("- a\n- b\n", "expected a mapping"),
        ("data: [unclosed\n", "not valid YAML"),
        (b"\xff\xfe\x00binary", "cannot read"),
    ],
    ids=["list", "bad-yaml", "binary"],
)
def test_load_params_bad_file(tmp_path, content, hint):
    path = tmp_path / "params.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError, match=hint) as info:
        load_params(path)
    assert str(path) in str(info.value)


def test_load_params_on_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_params(tmp_path)


def test_load_params_error_names_the_file(tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text("augment:\n  flipp: 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value).startswith(f"{path}: 1 invalid setting(s):")
    assert "augment.flipp: unknown key" in str(info.value)


def test_params_are_frozen():
    params = parse_params({})
    with pytest.raises(Exception, match="frozen"):
        params.augment.copies = 5  # type: ignore[misc]


def test_section_dict_flattens_nested_sections():
    params = parse_params({"data": {"demo": {"seed": 7}}})
    flat = section_dict(params.data, "data")
    assert flat["data.demo.seed"] == 7
    assert flat["data.folder.path"] is None
    assert flat["data.source"] == "demo"
    assert not any(isinstance(v, dict) for v in flat.values())


_KEY = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12)


# ------------------------------------------------------------ properties over the whole schema
#
# Every section and every leaf key is found by walking the Params schema, so a key added
# later is covered without editing this file.


def _is_section(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _schema_sections(model: type[BaseModel] = Params, prefix: str = "") -> dict[str, type[BaseModel]]:
    sections = {prefix: model}
    for name, field in model.model_fields.items():
        if _is_section(field.annotation):
            sections |= _schema_sections(field.annotation, f"{prefix}.{name}".lstrip("."))
    return sections


SCHEMA_SECTIONS = _schema_sections()


@settings(max_examples=20, deadline=None)
@given(key=_KEY)
@pytest.mark.parametrize("section", sorted(SCHEMA_SECTIONS))
def test_random_unknown_keys_are_always_rejected_and_named(section, key):
    known = SCHEMA_SECTIONS[section].model_fields
    assume(key not in known)
    dotted = f"{section}.{key}".lstrip(".")
    message = _load_error(_nest(dotted, 0))
    assert message.splitlines()[0].endswith(": 1 invalid setting(s):")
    assert f"{dotted}: unknown key; allowed keys here: {', '.join(sorted(known))}" in message


@dataclass(frozen=True)
class Leaf:
    """One params key as the schema declares it."""

    key: str
    types: frozenset  # the plain types it takes: int, float, str, list, NoneType
    literals: tuple  # the values a Literal member allows
    bounds: tuple  # annotated_types constraints: Ge, Gt, Le, Lt (numbers), MinLen, MaxLen (text)
    pattern: str | None


def _leaf(key: str, annotation: object, metadata: list) -> Leaf:
    types, literals, bounds, pattern = set(), [], list(metadata), None
    pending = [annotation]
    while pending:
        member = pending.pop()
        origin = get_origin(member)
        if origin is Literal:
            literals += get_args(member)
        elif origin is list:
            types.add(list)
        elif origin is Annotated:
            base, *extra = get_args(member)
            pending.append(base)
            bounds += [m for info in extra for m in getattr(info, "metadata", [info])]
        elif get_args(member):  # a union
            pending += get_args(member)
        else:
            types.add(member)
    for item in list(bounds):
        if getattr(item, "pattern", None):
            pattern = item.pattern
    kinds = (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt)
    kinds += (annotated_types.MinLen, annotated_types.MaxLen)
    return Leaf(
        key, frozenset(types), tuple(literals), tuple(b for b in bounds if isinstance(b, kinds)), pattern
    )


LEAVES = {
    f"{prefix}.{name}".lstrip("."): _leaf(f"{prefix}.{name}".lstrip("."), field.annotation, field.metadata)
    for prefix, model in SCHEMA_SECTIONS.items()
    for name, field in model.model_fields.items()
    if not _is_section(field.annotation)
}
CONSTRAINED = sorted(k for k, leaf in LEAVES.items() if leaf.bounds or leaf.literals or leaf.pattern)
YAML_BOOLEAN_WORDS = {"on", "off", "yes", "no", "true", "false"}
_WORD = st.text(alphabet=string.ascii_letters + "_", min_size=1, max_size=10)


def _parses_as_number(text: str) -> bool:
    try:
        float(text)  # inf, nan, infinity are numbers to pydantic too
    except ValueError:
        return False
    return True


def _wrong_type(leaf: Leaf) -> st.SearchStrategy:
    """Values no member of the key's type takes, whatever their size."""
    numeric = bool(leaf.types & {int, float}) or any(isinstance(v, int) for v in leaf.literals)
    pools = [st.dictionaries(_KEY, st.integers(), min_size=1, max_size=2)]
    if bool not in leaf.types and not YAML_BOOLEAN_WORDS & set(leaf.literals):  # there they stand for words
        pools.append(st.booleans())
    if list not in leaf.types:
        pools.append(st.lists(st.integers(0, 9), min_size=1, max_size=3))
    if type(None) not in leaf.types:
        pools.append(st.none())
    if str not in leaf.types:
        pools.append(
            _WORD.filter(lambda w: w not in leaf.literals and not (numeric and _parses_as_number(w)))
        )
    if float not in leaf.types:
        pools.append(st.floats(-1e6, 1e6).filter(lambda x: not x.is_integer()))
    if not numeric:
        pools.append(st.integers(-(10**6), 10**6))
    return st.one_of(pools)


def _beyond(bound: object, as_int: bool) -> st.SearchStrategy:
    """Values that break one numeric bound."""
    ((name, limit),) = ((k, getattr(bound, k)) for k in ("ge", "gt", "le", "lt") if hasattr(bound, k))
    below = name in ("ge", "gt")
    strict = name in ("ge", "le")  # the limit itself is allowed by ge/le, not by gt/lt
    if as_int:
        edge = math.ceil(limit) - 1 if below and strict else math.floor(limit) if below else None
        if not below:
            edge = math.floor(limit) + 1 if strict else math.ceil(limit)
        return st.integers(max_value=edge) if below else st.integers(min_value=edge)
    side = {"max_value": limit} if below else {"min_value": limit}
    return st.floats(**side, exclude_min=strict and not below, exclude_max=strict and below,
                     allow_nan=False, allow_infinity=False)  # fmt: skip


def _out_of_range(leaf: Leaf) -> st.SearchStrategy:
    """Values of a type the key takes that break one of its constraints."""
    numeric = bool(leaf.types & {int, float}) or any(isinstance(v, int) for v in leaf.literals)
    pools = []
    for bound in leaf.bounds:
        if isinstance(bound, annotated_types.MinLen):
            pools.append(st.just("x" * (bound.min_length - 1)))
        elif isinstance(bound, annotated_types.MaxLen):
            pools.append(st.integers(bound.max_length + 1, bound.max_length + 50).map(lambda n: "a" * n))
        else:
            pools.append(_beyond(bound, as_int=float not in leaf.types))
    if leaf.pattern:
        pools.append(st.sampled_from("-_. #").map(lambda c: c + "name"))
    if any(isinstance(v, str) for v in leaf.literals) and str not in leaf.types:
        pools.append(
            _WORD.filter(lambda w: w not in leaf.literals and not (numeric and _parses_as_number(w)))
        )
    if any(isinstance(v, int) for v in leaf.literals) and not leaf.types & {int, float}:
        pools.append(st.integers(-(10**4), 10**4).filter(lambda n: n not in leaf.literals))
    return st.one_of(pools)


def _load_error(raw: dict) -> str:
    """load_params on a real YAML file holding ``raw``: the message it fails with."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "params.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        with pytest.raises(ConfigError) as info:
            load_params(path)
    return str(info.value).replace(str(path), "params.yaml")


def _the_line(message: str, key: str) -> str:
    """The one error, on the one line for this key."""
    header, *lines = message.splitlines()
    assert header == "params.yaml: 1 invalid setting(s):", message
    assert len(lines) == 1 and lines[0].startswith(f"  {key}: "), message
    return lines[0]


_TYPE_WORDS = {
    bool: ("boolean", "true or false"),
    int: ("integer",),
    float: ("number",),
    str: ("string", "text"),
    list: ("list",),
}


def _says_what_type_is_allowed(line: str, leaf: Leaf) -> bool:
    lists_values = all(repr(v) in line for v in leaf.literals)
    words = [w for t in leaf.types for w in _TYPE_WORDS.get(t, ())]
    return lists_values and (not words or any(w in line for w in words))


_BOUND_WORDS = {
    annotated_types.Ge: ("ge", "greater than or equal to"),
    annotated_types.Gt: ("gt", "greater than"),
    annotated_types.Le: ("le", "less than or equal to"),
    annotated_types.Lt: ("lt", "less than"),
}


def _bound_phrases(leaf: Leaf) -> list[str]:
    phrases = []
    for bound in leaf.bounds:
        if isinstance(bound, annotated_types.MinLen):
            phrases.append(f"at least {bound.min_length} character")
        elif isinstance(bound, annotated_types.MaxLen):
            phrases.append(f"at most {bound.max_length} characters")
        else:
            attr, words = _BOUND_WORDS[type(bound)]
            limit = getattr(bound, attr)
            shown = int(limit) if float(limit).is_integer() else limit  # pydantic writes 1.0 as 1
            phrases.append(f"{words} {shown}")
    if leaf.pattern:
        phrases.append(f"match pattern '{leaf.pattern}'")
    if leaf.literals:
        phrases.append(", ".join(repr(v) for v in leaf.literals[:-1]))
    return phrases


@settings(max_examples=12, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("key", sorted(LEAVES))
def test_a_wrong_type_for_any_key_is_one_line_naming_key_value_and_what_is_allowed(key, data):
    leaf = LEAVES[key]
    value = data.draw(_wrong_type(leaf), label="value")
    line = _the_line(_load_error(_nest(key, value)), key)
    assert f"(got {value!r})" in line
    assert _says_what_type_is_allowed(line, leaf), line


@settings(max_examples=12, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("key", CONSTRAINED)
def test_a_value_out_of_range_for_any_key_is_one_line_naming_key_value_and_what_is_allowed(key, data):
    leaf = LEAVES[key]
    value = data.draw(_out_of_range(leaf), label="value")
    line = _the_line(_load_error(_nest(key, value)), key)
    assert f"(got {value!r})" in line
    assert any(phrase in line for phrase in _bound_phrases(leaf)), line


def test_the_schema_walk_sees_every_kind_of_key():
    # guards the walk itself: a walk that found nothing would make the properties above vacuous
    flat = {k for name in Params.model_fields for k in section_dict(getattr(Params(), name), name)}
    assert set(LEAVES) == flat
    assert LEAVES["fine_tune.unfreeze_blocks"].literals == ("all",)
    assert LEAVES["fine_tune.unfreeze_blocks"].types == {int}
    assert LEAVES["fine_tune.unfreeze_blocks"].bounds == (annotated_types.Ge(0),)
    assert [type(b) for b in LEAVES["split.val_fraction"].bounds] == [annotated_types.Gt, annotated_types.Lt]
    assert LEAVES["registry.model_name"].pattern and len(CONSTRAINED) > 60


def test_yaml_boolean_spelling_of_an_allowed_word_is_that_word(tmp_path):
    # params.yaml documents `mixed_precision: auto | off`, and YAML reads an unquoted off as False
    path = tmp_path / "params.yaml"
    path.write_text("train_frozen:\n  mixed_precision: off\nfine_tune:\n  mixed_precision: off\n")
    params = load_params(path)
    assert params.train_frozen.mixed_precision == "off" and params.fine_tune.mixed_precision == "off"
    path.write_text("fine_tune:\n  class_weight: no\n")  # "no" is not one of its words: still an error
    with pytest.raises(
        ConfigError, match=r"fine_tune\.class_weight: expected one of 'auto', 'balanced', 'none'"
    ):
        load_params(path)


def test_a_stage_script_stops_on_an_unknown_key_before_writing_anything(tmp_path):
    """The real split script, as DVC runs it: exit 1, one message, no output folder or summary."""
    repo = Path(__file__).resolve().parents[2]
    params = yaml.safe_load(REPO_PARAMS.read_text())
    params["split"]["seeed"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out, summary = tmp_path / "split", tmp_path / "results" / "summary.json"
    command = [sys.executable, str(repo / "stages" / "split.py"), "--params", str(tmp_path / "params.yaml"),
               "--raw", str(tmp_path / "raw"), "--out", str(out), "--summary", str(summary)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(repo / "src")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("split: error: ")]
    assert len(errors) == 1 and errors[0].endswith("1 invalid setting(s):")
    assert "  split.seeed: unknown key; allowed keys here: duplicates, group_pattern, seed," in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_shipped_params_yaml_spells_out_the_code_defaults() -> None:
    """params.yaml is the documentation of the defaults: the two must not drift apart."""
    import yaml

    from tlpipe.core.config import Params, parse_params

    shipped = parse_params(yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text()))
    assert shipped == Params()


def test_gradual_unfreezing_counts_blocks_not_layers() -> None:
    message = _error({"fine_tune": {"unfreeze_every": 2, "unfreeze_from": "block14_add"}})
    assert "unfreeze_every works with unfreeze_blocks, not unfreeze_from" in message


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ([0.9, 1.5], "evaluate.operating_sensitivities.1: Input should be less than or equal to 1 (got 1.5)"),
        ([0], "evaluate.operating_sensitivities.0: Input should be greater than 0 (got 0)"),
        ([True], "evaluate.operating_sensitivities.0: Input should be a valid number (got True)"),
        (0.9, "evaluate.operating_sensitivities: Input should be a valid list (got 0.9)"),
    ],
)
def test_operating_sensitivities_name_the_bad_item(value, says):
    # the schema walk above sees the list, not its items: their bounds are checked here
    assert says in _error(_nest("evaluate.operating_sensitivities", value))


def test_operating_sensitivities_may_be_empty():
    assert parse_params(_nest("evaluate.operating_sensitivities", [])).evaluate.operating_sensitivities == []


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        (
            {"evaluate": {"calibration": "none"}},
            "set calibration to temperature, platt or isotonic, or decision_data to val",
        ),
        ({"train_frozen": {"oof_folds": 0}}, "evaluate.decision_data oof needs out-of-fold predictions"),
        ({"train_frozen": {"oof_folds": 1}}, "train_frozen.oof_folds: one fold holds nothing out"),
    ],
)
def test_the_oof_decision_rule_refuses_settings_it_cannot_work_with(raw, named):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert named in str(err.value)


def test_the_val_rule_works_without_folds_or_calibration():
    params = parse_params(
        {"evaluate": {"decision_data": "val", "calibration": "none"}, "train_frozen": {"oof_folds": 0}}
    )
    assert (params.evaluate.decision_data, params.train_frozen.oof_folds) == ("val", 0)
