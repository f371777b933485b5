"""The promotion gate: challenger alias on every new model, champion only for a winner."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import mlflow
import pytest
import yaml

from tlpipe.command_line import main
from tlpipe.core.config import RegistryParams
from tlpipe.core.errors import PipelineError
from tlpipe.core.files import path_digest
from tlpipe.ops.registry import CHALLENGER, CHAMPION, beats, decide, promote

pytestmark = pytest.mark.slow  # logs and registers models in an MLflow store, seconds each

# a stand-in for the evaluate stage's pyfunc model: registering needs a logged model, not TensorFlow
MODEL_CODE = """
import mlflow.pyfunc
from mlflow.models import set_model


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str]) -> list[str]:
        return model_input


set_model(Echo())
"""


@pytest.mark.parametrize(
    ("challenger", "champion", "metric", "margin", "wins"),
    [
        (0.91, 0.90, "roc_auc", 0.0, True),
        (0.90, 0.90, "roc_auc", 0.0, False),  # a tie does not move the champion
        (0.905, 0.90, "roc_auc", 0.01, False),  # better, but not by the margin
        (0.92, 0.90, "roc_auc", 0.01, True),
        (0.89, 0.90, "accuracy", 0.0, False),
        (0.20, 0.30, "log_loss", 0.0, True),  # lower is better
        (0.30, 0.20, "log_loss", 0.0, False),
        (0.25, 0.30, "brier", 0.1, False),
    ],
)
def test_beats_respects_direction_and_margin(challenger, champion, metric, margin, wins):
    assert beats(challenger, champion, metric, margin) is wins


def test_decide_without_champion_promotes_and_explains():
    promoted, reason = decide("roc_auc", 0.05, 0.5, None)
    assert promoted and "no champion yet" in reason
    promoted, reason = decide("roc_auc", 0.0, 0.8, 0.9)
    assert not promoted and "0.8000" in reason and "0.9000" in reason and "refused" in reason


class Pipeline:
    """Fake pipeline outputs plus the evaluate run that would have logged them."""

    def __init__(self, root: Path):
        self.root = root
        self.code = root / "model_code.py"
        self.code.write_text(MODEL_CODE)
        self.count = 0

    def evaluated(self, metrics: dict, model_bytes: bytes | None = None) -> tuple[Path, Path]:
        self.count += 1
        out = self.root / f"run{self.count}"
        (out / "evaluate").mkdir(parents=True)
        (out / "evaluate" / "metrics.json").write_text(json.dumps(metrics))
        model = out / "model.keras"
        model.write_bytes(model_bytes if model_bytes is not None else uuid.uuid4().bytes)
        tags = {"tlpipe.stage": "evaluate", "tlpipe.model_digest": path_digest(model)}
        with mlflow.start_run(tags=tags):
            info = mlflow.pyfunc.log_model(name="classifier", python_model=str(self.code))
            mlflow.set_tag("tlpipe.logged_model_id", info.model_id)
            mlflow.log_metrics({k: v for k, v in metrics.items() if v is not None})
        return out / "evaluate", model


@pytest.fixture
def pipeline(tmp_path) -> Pipeline:
    return Pipeline(tmp_path)


@pytest.fixture
def registry() -> RegistryParams:
    return RegistryParams(model_name=f"tlpipe-test-{uuid.uuid4().hex[:8]}", metric="roc_auc", margin=0.01)


def _aliases(name: str) -> dict[str, int]:
    client = mlflow.MlflowClient()
    return {
        alias: int(client.get_model_version_by_alias(name, alias).version) for alias in (CHAMPION, CHALLENGER)
    }


def test_first_model_becomes_champion_then_a_worse_one_is_refused(pipeline, registry, tmp_path):
    decision_file = tmp_path / "results" / "promotion.json"
    first = promote(*pipeline.evaluated({"roc_auc": 0.90, "accuracy": 0.8}), registry, decision_file)
    assert first["decision"] == "promoted" and first["champion"] is None
    assert first["challenger"]["version"] == 1 and first["challenger"]["value"] == 0.90
    assert _aliases(registry.model_name) == {CHAMPION: 1, CHALLENGER: 1}

    worse = promote(*pipeline.evaluated({"roc_auc": 0.85, "accuracy": 0.9}), registry, decision_file)
    assert worse["decision"] == "refused"
    assert worse["challenger"] | {"run_id": None} == {"version": 2, "value": 0.85, "run_id": None}
    assert worse["champion"]["version"] == 1 and worse["champion"]["value"] == 0.90
    assert _aliases(registry.model_name) == {CHAMPION: 1, CHALLENGER: 2}
    assert json.loads(decision_file.read_text()) == worse  # the file holds the latest decision

    within_margin = promote(*pipeline.evaluated({"roc_auc": 0.905}), registry, decision_file)
    assert within_margin["decision"] == "refused"
    better = promote(*pipeline.evaluated({"roc_auc": 0.95}), registry, decision_file)
    assert better["decision"] == "promoted" and better["champion"]["version"] == 1
    assert _aliases(registry.model_name) == {CHAMPION: 4, CHALLENGER: 4}


def test_decision_is_logged_to_mlflow_and_tagged_on_the_version(pipeline, registry, tmp_path):
    decision = promote(*pipeline.evaluated({"roc_auc": 0.7}), registry, tmp_path / "d.json")
    client = mlflow.MlflowClient()
    version = client.get_model_version(registry.model_name, "1")
    assert version.tags["tlpipe.decision"] == "promoted"
    assert float(version.tags["tlpipe.metric.roc_auc"]) == 0.7
    runs = mlflow.search_runs(filter_string="tags.`tlpipe.stage` = 'promote'", output_format="list")
    mine = [r for r in runs if r.data.tags.get("tlpipe.challenger_version") == "1"
            and r.data.params.get("registry.model_name") == registry.model_name]  # fmt: skip
    assert len(mine) == 1
    assert mine[0].data.metrics["challenger_value"] == 0.7 and mine[0].data.metrics["promoted"] == 1
    artifacts = [f.path for f in client.list_artifacts(mine[0].info.run_id)]
    assert "d.json" in artifacts
    assert decision["challenger"]["run_id"] != mine[0].info.run_id  # the evaluate run, not this one


def test_the_champion_again_registers_nothing(pipeline, registry, tmp_path):
    evaluation, model = pipeline.evaluated({"roc_auc": 0.8}, model_bytes=b"same model")
    promote(evaluation, model, registry, tmp_path / "d.json")
    again = promote(evaluation, model, registry, tmp_path / "d.json")
    assert again["decision"] == "unchanged"
    assert len(mlflow.MlflowClient().search_model_versions(f"name = '{registry.model_name}'")) == 1


def test_lower_is_better_metric(pipeline, registry, tmp_path):
    params = registry.model_copy(update={"metric": "log_loss", "margin": 0.0})
    promote(*pipeline.evaluated({"log_loss": 0.5}), params, tmp_path / "d.json")
    assert (
        promote(*pipeline.evaluated({"log_loss": 0.6}), params, tmp_path / "d.json")["decision"] == "refused"
    )
    assert (
        promote(*pipeline.evaluated({"log_loss": 0.4}), params, tmp_path / "d.json")["decision"] == "promoted"
    )


def test_undefined_metric_is_a_clear_error(pipeline, registry, tmp_path):
    evaluation, model = pipeline.evaluated({"roc_auc": None, "accuracy": 0.9})
    with pytest.raises(PipelineError, match=r"no value for roc_auc.*accuracy"):
        promote(evaluation, model, registry, tmp_path / "d.json")
    assert not (tmp_path / "d.json").exists()


def test_model_never_evaluated_is_a_clear_error(tmp_path, registry):
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "metrics.json").write_text('{"roc_auc": 0.9}')
    (tmp_path / "model.keras").write_bytes(b"never evaluated")
    with pytest.raises(PipelineError, match=r"no finished evaluate run of .*model.keras.*dvc repro"):
        promote(tmp_path / "evaluate", tmp_path / "model.keras", registry, tmp_path / "d.json")
    assert not (tmp_path / "d.json").exists()


def test_promote_command_reads_params_and_writes_the_decision(pipeline, registry, tmp_path, capsys):
    evaluation, model = pipeline.evaluated({"roc_auc": 0.9})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"registry": {"model_name": registry.model_name, "metric": "roc_auc"}}))
    out = tmp_path / "promotion.json"
    argv = ["promote", "--params", str(params), "--evaluation", str(evaluation), "--model", str(model)]
    assert main([*argv, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["decision"] == "promoted"
    assert "becomes champion" in capsys.readouterr().err
    params.write_text(yaml.safe_dump({"registry": {"metric": "roc_auc_typo"}}))
    assert main([*argv, "--out", str(out)]) == 1
    assert "registry.metric" in capsys.readouterr().err


def test_a_new_version_gets_the_model_card_as_its_description(pipeline, registry, tmp_path):
    card = tmp_path / "model_card.md"
    card.write_text("# Model card: tlpipe classifier\n\n## Intended use\n\n- triage, checked by a reader\n")
    promote(*pipeline.evaluated({"roc_auc": 0.7}), registry, tmp_path / "d.json", card)
    version = mlflow.MlflowClient().get_model_version(registry.model_name, "1")
    assert version.description == card.read_text()
