"""``tlpipe promote``: the promotion gate between a pipeline run and the MLflow model registry.

Run after ``dvc repro``. The evaluate stage logged the final model (a pyfunc that
takes raw image bytes) in its MLflow run; this finds that run by the digest of
``models/model.keras``, registers the model under ``registry.model_name`` and
gives the new version the alias ``challenger``. The alias ``champion`` moves to it
only when its test ``registry.metric`` beats the champion's by more than
``registry.margin``. The decision and both figures go to a JSON file and to an
MLflow run. It is not a DVC stage: its result depends on the registry's state,
which DVC cannot version.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from tlpipe.core import constants as C
from tlpipe.core import tracking
from tlpipe.core.config import PROMOTION_METRICS, RegistryParams, load_params, section_dict
from tlpipe.core.errors import PipelineError
from tlpipe.core.files import atomic_write, path_digest, read_json

CHAMPION = "champion"
CHALLENGER = "challenger"
PYFUNC_NAME = "classifier"  # the evaluate run's pyfunc model

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--evaluation", type=Path, default=Path("results/evaluate"), help="evaluate's output")
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"), help="the evaluated model")
    parser.add_argument("--out", type=Path, default=Path("results/promotion.json"), help="the decision")
    parser.add_argument(
        "--model-card",
        type=Path,
        default=Path("results/report/model_card.md"),
        help="the report stage's model card: the registered version's description",
    )


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    tracking.check_reachable()
    decision = promote(args.evaluation, args.model, params.registry, args.out, args.model_card)
    logger.info("tlpipe promote: %s", decision["reason"])
    return 0


def beats(challenger: float, champion: float, metric: str, margin: float) -> bool:
    """Whether the challenger wins by more than ``margin`` (in the metric's better direction)."""
    gain = challenger - champion if PROMOTION_METRICS[metric] else champion - challenger
    return gain > margin


def decide(metric: str, margin: float, challenger: float, champion: float | None) -> tuple[bool, str]:
    """(promote?, why) for a challenger's and the champion's figures (None: no champion yet)."""
    better = "higher" if PROMOTION_METRICS[metric] else "lower"
    if champion is None:
        return True, f"no champion yet: the challenger ({metric} {challenger:.4f}) becomes champion"
    if beats(challenger, champion, metric, margin):
        return True, (
            f"challenger {metric} {challenger:.4f} beats champion {champion:.4f} "
            f"by more than {margin:g} ({better} is better): promoted"
        )
    return False, (
        f"challenger {metric} {challenger:.4f} does not beat champion {champion:.4f} "
        f"by more than {margin:g} ({better} is better): refused"
    )


def challenger_value(evaluation_dir: Path, metric: str) -> float:
    metrics = read_json(Path(evaluation_dir) / "metrics.json")
    value = metrics.get(metric)
    if value is None or not math.isfinite(float(value)):
        raise PipelineError(
            f"{evaluation_dir}/metrics.json has no value for {metric} (undefined on this test split?); "
            f"set registry.metric to one it has: "
            f"{', '.join(m for m in PROMOTION_METRICS if metrics.get(m) is not None)}"
        )
    return float(value)


def evaluated_run(client, experiment_id: str, digest: str, model_path: Path):
    """The latest finished evaluate run of the model with this digest."""
    found = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{C.STAGE_TAG}` = 'evaluate' and tags.`{C.MODEL_DIGEST_TAG}` = '{digest}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not found:
        raise PipelineError(
            f"no finished evaluate run of {model_path} (sha256 {digest[:12]}) in the MLflow store "
            f"{tracking.tracking_uri()}, experiment {tracking.experiment_name()}; "
            "run `dvc repro` (or `dvc repro --force evaluate` if the store was replaced) first"
        )
    return found[0]


def champion_version(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no such registered model, or no champion alias yet
        return None


def promote(
    evaluation_dir: Path,
    model_path: Path,
    params: RegistryParams,
    decision_out: Path,
    model_card: Path | None = None,
) -> dict:
    """Register the evaluated model as challenger, promote it if it wins; write and log the decision.

    A new version gets ``model_card`` (the report stage's) as its description.
    """
    import mlflow

    value = challenger_value(evaluation_dir, params.metric)
    digest = path_digest(model_path)
    with tracking.stage_run("promote", section_dict(params, "registry")) as run:
        client = mlflow.MlflowClient()
        source = evaluated_run(client, run.info.experiment_id, digest, model_path)
        champion = champion_version(client, params.model_name)
        champion_value = (
            None if champion is None else float(champion.tags[C.METRIC_TAG_PREFIX + params.metric])
        )
        if champion is not None and champion.tags.get(C.MODEL_DIGEST_TAG) == digest:
            version, promoted = champion, False
            reason = f"the champion (version {champion.version}) is this model already: nothing to register"
            outcome = "unchanged"
        else:
            version = register(client, params, source, digest, value)
            if model_card is not None and Path(model_card).is_file():
                card = Path(model_card).read_text(encoding="utf-8")
                client.update_model_version(params.model_name, version.version, description=card)
            promoted, reason = decide(params.metric, params.margin, value, champion_value)
            outcome = "promoted" if promoted else "refused"
            if promoted:
                client.set_registered_model_alias(params.model_name, CHAMPION, version.version)
        decision = {
            "decision": outcome,
            "model_name": params.model_name,
            "metric": params.metric,
            "higher_is_better": PROMOTION_METRICS[params.metric],
            "margin": params.margin,
            "challenger": {"version": int(version.version), "value": value, "run_id": source.info.run_id},
            "champion": None
            if champion is None
            else {"version": int(champion.version), "value": champion_value, "run_id": champion.run_id},
            "reason": reason,
        }
        client.set_model_version_tag(params.model_name, version.version, C.DECISION_TAG, outcome)
        atomic_write(
            Path(decision_out),
            lambda tmp: tmp.write_text(json.dumps(decision, indent=2) + "\n", encoding="utf-8"),
        )
        mlflow.set_tags({C.DECISION_TAG: outcome, C.CHALLENGER_VERSION_TAG: str(version.version)})
        mlflow.log_metrics(
            {"challenger_value": value, "promoted": int(promoted)}
            | ({} if champion_value is None else {"champion_value": champion_value})
        )
        mlflow.log_artifact(str(decision_out))
    return decision


def register(client, params: RegistryParams, source, digest: str, value: float):
    """A new version of the registered model from the evaluate run's pyfunc model, aliased challenger."""
    import mlflow

    logged = source.data.tags.get(C.LOGGED_MODEL_TAG)
    uri = f"models:/{logged}" if logged else f"runs:/{source.info.run_id}/{PYFUNC_NAME}"
    tags = {C.MODEL_DIGEST_TAG: digest, C.METRIC_TAG_PREFIX + params.metric: repr(value)}
    version = mlflow.register_model(uri, params.model_name, tags=tags)
    # the figure on any metric a later gate may be configured with, from the evaluate run
    for name in PROMOTION_METRICS:
        if name in source.data.metrics and name != params.metric:
            client.set_model_version_tag(
                params.model_name,
                version.version,
                C.METRIC_TAG_PREFIX + name,
                repr(source.data.metrics[name]),
            )
    client.set_registered_model_alias(params.model_name, CHALLENGER, version.version)
    return version
