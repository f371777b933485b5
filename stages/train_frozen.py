"""DVC stage `train-frozen`: a new head on a frozen ImageNet backbone."""

import sys

from tlpipe.stage_runner import stage_main
from tlpipe.train.frozen import train_frozen

if __name__ == "__main__":
    sys.exit(
        stage_main(
            "train-frozen",
            ["data"],
            ["model", "history", "oof"],
            lambda p, a: train_frozen(a.data, p.train_frozen, a.model, a.history, a.checkpoints, a.oof),
            state=["checkpoints"],
        )
    )
