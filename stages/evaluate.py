"""DVC stage `evaluate`: the decision fitted (calibration, threshold; on val or out of fold), then test-split metrics with CIs,
plot data and predictions."""

import sys

from tlpipe.evaluate.stage import evaluate
from tlpipe.stage_runner import stage_main

if __name__ == "__main__":
    sys.exit(
        stage_main(
            "evaluate",
            ["data", "model", "oof"],
            ["out", "decision", "guard"],
            lambda p, a: evaluate(
                a.data, a.model, p.evaluate, a.out, p.train_frozen.weights, a.decision, a.guard, a.oof
            ),
        )
    )
