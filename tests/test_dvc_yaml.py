"""dvc.yaml declares, for each stage, exactly the code it runs and the params it reads."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = SPEC["stages"]


def tlpipe_imports(path: Path) -> set[str]:
    """Modules of tlpipe a file imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "tlpipe":
                found |= {f"tlpipe.{alias.name}" for alias in node.names}
            elif node.module.startswith("tlpipe."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tlpipe.")}
    return found


def module_file(module: str) -> str:
    return f"src/{module.replace('.', '/')}.py"


# code a module runs without importing it: MLflow loads serving_model.py by path (models from code)
RUNS_BY_PATH = {"src/tlpipe/serving.py": ["src/tlpipe/serving_model.py"]}


def code_closure(script: str) -> set[str]:
    """The stage script and every tlpipe module it can reach."""
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [module_file(m) for m in tlpipe_imports(REPO / path)] + RUNS_BY_PATH.get(path, [])
    return seen


def test_files_run_by_path_are_named_by_their_module():
    for module, files in RUNS_BY_PATH.items():
        for file in files:
            assert Path(file).name in (REPO / module).read_text()


def script_of(stage: dict) -> str:
    return re.search(r"stages/\S+\.py", stage["cmd"]).group(0)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_declares_exactly_the_code_it_runs(name):
    stage = STAGES[name]
    declared = {d for d in stage["deps"] if d.endswith(".py")}
    assert declared == code_closure(script_of(stage))


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_paths_are_relative_and_on_its_command_line(name):
    stage = STAGES[name]
    paths = [d for d in stage["deps"] if not d.endswith(".py")]
    for kind in ("outs", "metrics", "plots"):
        paths += [next(iter(e)) if isinstance(e, dict) else e for e in stage.get(kind, [])]
    named = re.findall(r"--[\w-]+ (\S+)", stage["cmd"])
    for path in paths:
        assert not Path(path).is_absolute()
        on_cmd = any(path == n or path.startswith(n.rstrip("/") + "/") for n in named)
        assert on_cmd, f"{name}: {path} is not on the command line (itself or its folder)"


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
