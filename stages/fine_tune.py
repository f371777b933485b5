"""DVC stage `fine-tune`: unfreeze the top backbone blocks and train on at a lower rate."""

import sys

from tlpipe.stage_runner import stage_main
from tlpipe.train.fine_tune import fine_tune

if __name__ == "__main__":
    sys.exit(
        stage_main(
            "fine-tune",
            ["data", "model-in"],
            ["model", "history"],
            lambda p, a: fine_tune(
                a.data, a.model_in, p.fine_tune, a.model, a.history, a.checkpoints, p.train_frozen.weights
            ),
            state=["checkpoints"],
        )
    )
