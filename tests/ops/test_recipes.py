"""Dataset recipes: every shipped recipe fits the params schema, and applying one edits params.yaml
in place, comments kept, refusing a recipe that does not fit."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tlpipe.core.config import parse_params
from tlpipe.core.errors import PipelineError
from tlpipe.ops.recipes import apply_recipe, load_recipe, recipe_names, recipe_path, settings

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
PARAMS_TEXT = (REPO / "params.yaml").read_text()


def test_the_four_dataset_recipes_ship():
    assert recipe_names(RECIPES) == ["dermamnist", "ham10000", "kermany", "pneumoniamnist"]


@pytest.mark.parametrize("name", ["dermamnist", "ham10000", "kermany", "pneumoniamnist"])
def test_each_recipe_applied_to_params_yaml_validates_and_sets_exactly_its_keys(name):
    recipe = load_recipe(recipe_path(name, RECIPES))
    text = apply_recipe(PARAMS_TEXT, recipe)
    before, after = yaml.safe_load(PARAMS_TEXT), yaml.safe_load(text)
    parse_params(after)
    for key, value in settings(recipe):
        node = after
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    changed = {k for k, _ in settings(after)} ^ {k for k, _ in settings(before)}
    assert changed <= {k for k, _ in settings(recipe)}  # only new keys the recipe adds
    untouched = {k: v for k, v in settings(before) if k not in dict(settings(recipe))}
    assert untouched == {k: v for k, v in settings(after) if k in untouched}


def test_applying_a_recipe_keeps_the_comments_and_nulls_of_params_yaml():
    text = apply_recipe(PARAMS_TEXT, load_recipe(recipe_path("kermany", RECIPES)))
    assert "# tlpipe parameters: every key is validated" in text
    assert "source: folder" in text and "# demo | folder | csv | medmnist | url" in text
    assert "classes: null" in text  # not rewritten as an empty value
    assert yaml.safe_load(text)["split"]["group_pattern"] == r"^((?:NORMAL2-)?IM-\d+|person\d+)[-_]"
    assert len(text.splitlines()) == len(PARAMS_TEXT.splitlines())  # every key already had a line


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"split": {"group_patern": "x(1)"}}, "split.group_patern: unknown key"),
        ({"augment": {"image_size": 8}}, "augment.image_size"),
        ({"data": {"source": "folder", "folder": {"path": "/data/chest_xray"}}}, "inside data/sources/"),
    ],
)
def test_a_recipe_that_does_not_fit_is_refused_naming_the_key(recipe, message):
    with pytest.raises(PipelineError, match="the recipe does not fit") as err:
        apply_recipe(PARAMS_TEXT, recipe)
    assert message in str(err.value)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(
        PipelineError, match=r"no recipe 'kermani'.*dermamnist, ham10000, kermany, pneumoniamnist"
    ):
        recipe_path("kermani", RECIPES)


def _tlpipe(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    code = "import sys; from tlpipe.command_line import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, check=False
    )


def test_tlpipe_recipe_edits_params_yaml_and_prints_dvc_exp_run_sets(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS_TEXT)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "kermany.yaml").write_text((RECIPES / "kermany.yaml").read_text())
    sets = _tlpipe(tmp_path, "recipe", "kermany", "--sets")
    assert sets.returncode == 0, sets.stderr
    assert (tmp_path / "params.yaml").read_text() == PARAMS_TEXT  # --sets only prints
    words = shlex.split(sets.stdout)
    assert words[0::2] == ["-S"] * (len(words) // 2)
    assert "split.group_pattern=^((?:NORMAL2-)?IM-\\d+|person\\d+)[-_]" in words
    done = _tlpipe(tmp_path, "recipe", "kermany")
    assert done.returncode == 0, done.stderr
    params = parse_params(yaml.safe_load((tmp_path / "params.yaml").read_text()))
    assert (
        params.data.folder.path == "data/sources/chest_xray" and params.split.source_split_overlap == "warn"
    )
    listing = _tlpipe(tmp_path, "recipe", "--list")
    assert listing.stdout.startswith("kermany: The chest X-ray set of Kermany et al.")
