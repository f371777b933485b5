"""DVC stage `split`: leak-free stratified train/val/test manifests and a summary (DVC metrics)."""

import sys

from tlpipe.data.splitting import split_dataset
from tlpipe.stage_runner import stage_main

if __name__ == "__main__":
    sys.exit(
        stage_main(
            "split",
            ["raw"],
            ["out", "summary"],
            lambda p, a: split_dataset(a.raw, p.split, a.out, a.summary),
        )
    )
