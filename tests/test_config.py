"""params.yaml validation: every mistake fails fast with a message naming the key and value."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tlpipe.config import ConfigError, Params, load_params, parse_params, section_dict
from tlpipe.errors import PipelineError

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
SECTIONS = {
    "": ["augment", "data", "evaluate", "fine_tune", "registry", "split", "train_frozen"],
    "registry": ["margin", "metric", "model_name"],
    "augment": [
        "brightness_limit",
        "contrast_limit",
        "copies",
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
    "split": ["duplicates", "group_pattern", "seed", "source_splits", "test_fraction", "val_fraction"],
    "evaluate": [
        "batch_size",
        "bootstrap_resamples",
        "calibration_bins",
        "ci_level",
        "fixed_threshold",
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
    folder = parse_params({"data": {"source": "folder", "folder": {"path": "/some/where"}}})
    assert folder.data.folder.path == "/some/where"


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


@settings(max_examples=60, deadline=None)
@given(
    section=st.sampled_from([None, "data", "data.demo", "data.folder", "split", "augment", "fine_tune"]),
    key=_KEY,
)
def test_random_unknown_keys_are_always_rejected_and_named(section, key):
    known = Params.model_fields if section is None else _section_fields(section)
    assume(key not in known)
    dotted = key if section is None else f"{section}.{key}"
    message = _error(_nest(dotted, 0))
    assert f"{dotted}: unknown key; allowed keys here: {', '.join(sorted(known))}" in message


def _section_fields(section: str) -> dict:
    value = Params().model_dump()
    for part in section.split("."):
        value = value[part]
    return value


def test_shipped_params_yaml_spells_out_the_code_defaults() -> None:
    """params.yaml is the documentation of the defaults: the two must not drift apart."""
    import yaml

    from tlpipe.config import Params, parse_params

    shipped = parse_params(yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text()))
    assert shipped == Params()


def test_backbone_choices_are_the_registry() -> None:
    from tlpipe.backbones import REGISTRY
    from tlpipe.config import BACKBONES

    assert set(BACKBONES) == set(REGISTRY)


def test_gradual_unfreezing_counts_blocks_not_layers() -> None:
    message = _error({"fine_tune": {"unfreeze_every": 2, "unfreeze_from": "block14_add"}})
    assert "unfreeze_every works with unfreeze_blocks, not unfreeze_from" in message
