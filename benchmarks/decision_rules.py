"""Issue 17's comparison of the decision rules, as docs/decision.md fixed it before the runs.

In a scratch copy of the repository, one dataset brought in as the README says, the recipe applied, then
for each seed (``train_frozen.seed`` and ``fine_tune.seed``; split and augmentation unchanged) the pipeline
reproduced through evaluate. Evaluate fits both rules (``val`` and ``oof``) on the same model and writes
their test figures to ``metrics.json`` ``decision_rules``; this collects them per seed with the mean.
The frozen feature cache is reused across seeds (same backbone, same images). Not part of the test suite:
Kermany about 15 min per seed, PneumoniaMNIST about 8, on 2 cores.

    .venv/bin/python benchmarks/decision_rules.py kermany --seeds 1 2 3 --out results/rules_kermany.json
    .venv/bin/python benchmarks/decision_rules.py pneumoniamnist --seeds 1 2 3 --out results/rules_pmnist.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_repo import RECIPES, edit_params, environment, recipe_repo, report_json, run_stages

FIGURES = ("accuracy", "sensitivity", "specificity", "roc_auc", "ece", "threshold", "temperature")


def mean_table(per_seed: list[dict]) -> dict:
    """Each rule's figures averaged over the seeds (None where a seed lacks one)."""
    table: dict = {}
    for rule in ("val", "oof"):
        table[rule] = {}
        for name in FIGURES:
            values = [s["rules"][rule].get(name) for s in per_seed if rule in s["rules"]]
            numbers = [v for v in values if v is not None]
            table[rule][name] = (
                round(sum(numbers) / len(numbers), 4) if numbers and len(numbers) == len(values) else None
            )
    return table


def run(
    dataset: str,
    seeds: list[int],
    log_dir: Path,
    keep: Path | None = None,
    overrides: list[str] | None = None,
) -> dict:
    per_seed = []
    with tempfile.TemporaryDirectory(prefix=f"tlpipe-bench-rules-{dataset}-") as tmp:
        repo = Path(tmp)
        recipe_repo(repo, dataset, overrides or [])
        for seed in seeds:
            edit_params(repo, [f"train_frozen.seed={seed}", f"fine_tune.seed={seed}"])
            seconds, _ = run_stages(repo, f"{dataset}-seed{seed}", log_dir)
            metrics = json.loads((repo / "results/evaluate/metrics.json").read_text())
            kept = log_dir / f"{dataset}-seed{seed}"
            shutil.copytree(repo / "results", kept / "results", dirs_exist_ok=True)
            shutil.copy2(repo / "models/decision.json", kept / "decision.json")
            per_seed.append(
                {
                    "seed": seed,
                    "seconds": seconds,
                    "served_rule": metrics["calibration"]["fitted_on"],
                    "rules": {
                        rule: {k: figures.get(k) for k in (*FIGURES, "val_sensitivity", "val_specificity")}
                        for rule, figures in metrics["decision_rules"].items()
                        if "skipped" not in figures
                    },
                    "served": {
                        k: metrics.get(k)
                        for k in ("accuracy", "sensitivity", "specificity", "roc_auc", "ece")
                    },
                    "guard": metrics.get("guard"),
                    "shift": metrics.get("shift"),
                }
            )
            print(json.dumps(per_seed[-1]["rules"]), file=sys.stderr, flush=True)
        registered = register(repo, log_dir / f"{dataset}-registered.md")
        if keep is not None:  # the last seed's model with its decision, guard, results and classes
            for part in ("models", "results"):
                shutil.copytree(repo / part, keep / part, dirs_exist_ok=True)
            shutil.copy2(repo / "data/augmented/classes.json", keep / "classes.json")
    return {
        "dataset": dataset,
        "overrides": overrides or [],
        "seeds": seeds,
        "per_seed": per_seed,
        "mean": mean_table(per_seed),
        "registered": registered,
    }


def register(repo: Path, card_copy: Path) -> dict:
    """The last seed's model registered with its model card, as `tlpipe promote --model-card` does; the
    registered version's description read back from MLflow and kept beside the logs."""
    tlpipe = Path(sys.executable).parent / "tlpipe"
    env = environment(repo)
    subprocess.run([str(tlpipe), "promote", "--model-card", "results/report/model_card.md"], cwd=repo, env=env,
                   check=True)  # fmt: skip
    read_back = (
        "import json, mlflow; c = mlflow.MlflowClient(); "
        "v = max(c.search_model_versions(\"name='tlpipe-classifier'\"), key=lambda v: int(v.version)); "
        "print(json.dumps({'version': v.version, 'description': v.description}))"
    )
    out = subprocess.run([sys.executable, "-c", read_back], cwd=repo, env=env, check=True, capture_output=True,
                         text=True).stdout  # fmt: skip
    version = json.loads(out.strip().splitlines()[-1])
    card_copy.write_text(version["description"] or "")
    card = (repo / "results/report/model_card.md").read_text()
    return {
        "version": version["version"],
        "description_is_the_card": version["description"] == card,
        "served_check": served_check(repo, version["version"]),
    }


def served_check(repo: Path, version: str) -> dict:
    """One real test image through the registered (served) model and through `tlpipe predict` on the .keras
    file, against evaluate's predictions.csv row for it: the largest difference in any probability."""
    import csv

    with open(repo / "results/evaluate/predictions.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    image = repo / "data/augmented" / row["path"]
    env = environment(repo)
    tlpipe = Path(sys.executable).parent / "tlpipe"
    answers = {}
    for name, model in (
        ("served", f"models:/tlpipe-classifier/{version}"),
        ("predict", "models/model.keras"),
    ):
        out = subprocess.run([str(tlpipe), "predict", str(image), "--model", model], cwd=repo, env=env, check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
        answers[name] = next(csv.DictReader(out.splitlines()))
    numbers = [k for k in row if k.startswith(("p_", "raw_p_"))]
    gaps = {name: max(abs(float(a[k]) - float(row[k])) for k in numbers) for name, a in answers.items()}
    return {
        "image": row["path"],
        "evaluate": {k: row[k] for k in ("predicted", *numbers)},
        "labels_agree": all(a["predicted"] == row["predicted"] for a in answers.values()),
        "max_abs_difference": gaps,
    }


def markdown_table(result: dict) -> str:
    """Per seed and mean, each rule's test figures: the table docs/decision.md shows."""
    keys = ("accuracy", "sensitivity", "specificity", "roc_auc", "ece", "threshold", "temperature")
    lines = ["| seed | rule | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]

    def cell(value: object) -> str:
        return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    rows = [(str(s["seed"]), s["rules"]) for s in result["per_seed"]] + [("mean", result["mean"])]
    for seed, rules in rows:
        for rule in ("val", "oof"):
            if rule in rules:
                lines.append(
                    f"| {seed} | {rule} | " + " | ".join(cell(rules[rule].get(k)) for k in keys) + " |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", choices=sorted(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="a params.yaml setting on top of the recipe (dotted key, YAML value); repeatable",
    )  # fmt: skip
    parser.add_argument("--log-dir", type=Path, default=Path("results/bench_logs"))
    parser.add_argument(
        "--keep", type=Path, default=None, help="copy the last seed's models/ and results/ here"
    )
    parser.add_argument(
        "--table", type=Path, default=None, help="only print the Markdown table of a result JSON"
    )
    args = parser.parse_args(argv)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    if not RECIPES[args.dataset][1].exists():
        print(f"no {RECIPES[args.dataset][1]}: this benchmark needs ../shared/data", file=sys.stderr)
        return 2
    args.log_dir.mkdir(parents=True, exist_ok=True)
    result = run(args.dataset, args.seeds, args.log_dir, args.keep, args.overrides)
    report_json(result, args.out)
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
