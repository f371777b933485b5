"""dvc.yaml declares, for each stage, exactly the code it runs and the params it reads."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from pipeline_helpers import load_dvc_yaml
from tlpipe.core.constants import SOURCES_DIR

REPO = Path(__file__).resolve().parents[1]
SPEC = load_dvc_yaml(REPO)
STAGES = SPEC["stages"]


def tlpipe_imports(path: Path) -> set[str]:
    """Modules of tlpipe a file imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tlpipe":
            for alias in node.names:  # `from tlpipe.core import tracking` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if module_file(sub) else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tlpipe.")}
    return found


def module_file(module: str) -> str | None:
    """The file of a tlpipe module or package, relative to the repository; None if there is none."""
    base = f"src/{module.replace('.', '/')}"
    for candidate in (f"{base}.py", f"{base}/__init__.py"):
        if (REPO / candidate).is_file():
            return candidate
    return None


def packages_of(module: str) -> list[str]:
    """The package __init__ files Python runs before a module: tlpipe's, then its subpackage's."""
    parts = module.split(".")
    return [f"src/{'/'.join(parts[:i])}/__init__.py" for i in range(1, len(parts))]


# code a module runs without importing it: MLflow loads pyfunc_model.py by path (models from code)
RUNS_BY_PATH = {"src/tlpipe/serve/pyfunc.py": ["src/tlpipe/serve/pyfunc_model.py"]}


def code_closure(script: str) -> set[str]:
    """The stage script and every tlpipe file it can reach, package __init__ files included."""
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in tlpipe_imports(REPO / path):
            todo += [module_file(module), *packages_of(module)]
        todo += RUNS_BY_PATH.get(path, [])
    return seen


def declared_unit(path: str) -> str:
    """What dvc.yaml names for a code file: its subpackage folder, or the file itself at the top."""
    parts = Path(path).parts
    if parts[:2] == ("src", "tlpipe") and len(parts) > 3:
        return "/".join(parts[:3])
    return path


def test_files_run_by_path_are_named_by_their_module():
    for module, files in RUNS_BY_PATH.items():
        for file in files:
            assert Path(file).name in (REPO / module).read_text()


def script_of(stage: dict) -> str:
    return re.search(r"stages/\S+\.py", stage["cmd"]).group(0)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_declares_exactly_the_code_it_runs(name):
    stage = STAGES[name]
    declared = {d for d in stage["deps"] if d.startswith(("src/", "stages/"))}
    assert declared == {declared_unit(p) for p in code_closure(script_of(stage))}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_paths_are_relative_and_on_its_command_line(name):
    stage = STAGES[name]
    paths = [d for d in stage["deps"] if not d.startswith(("src/", "stages/"))]
    for kind in ("outs", "metrics", "plots"):
        paths += [next(iter(e)) if isinstance(e, dict) else e for e in stage.get(kind, [])]
    named = re.findall(r"--[\w-]+ (\S+)", stage["cmd"])
    for path in paths:
        assert not Path(path).is_absolute()
        if name == "download" and path == SOURCES_DIR:
            continue  # named by params.yaml's paths, which the config requires to lie inside it
        on_cmd = any(path == n or path.startswith(n.rstrip("/") + "/") for n in named)
        assert on_cmd, f"{name}: {path} is not on the command line (itself or its folder)"


def test_download_depends_on_the_sources_folder_the_config_requires():
    assert SOURCES_DIR in STAGES["download"]["deps"]
    assert (REPO / SOURCES_DIR / "README.md").is_file()  # so the dependency exists in a fresh clone
    assert not any(SOURCES_DIR in d for n, s in STAGES.items() if n != "download" for d in s["deps"])


def test_stage_scripts_are_thin():
    for script in sorted((REPO / "stages").glob("*.py")):
        tree = ast.parse(script.read_text())
        defs = [
            n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.For, ast.While))
        ]
        assert not defs, f"{script.name} holds logic; move it to src/tlpipe"
        assert len(script.read_text().splitlines()) < 25


def test_each_training_and_data_stage_reads_its_own_params_section():
    expected = {"download": ["data"], "split": ["split"], "augment": ["augment"],
                "train-frozen": ["train_frozen"], "fine-tune": ["fine_tune", "train_frozen.weights"], "evaluate": ["evaluate", "train_frozen.weights"]}  # fmt: skip
    for name, params in expected.items():
        assert STAGES[name]["params"] == params


def test_final_model_is_a_declared_artifact():
    artifact = SPEC["artifacts"]["tlpipe-classifier"]
    assert artifact["type"] == "model"
    assert artifact["path"] in STAGES["fine-tune"]["outs"]
