"""DVC stage `split`: stratified train/val/test manifests."""

import sys

from tlpipe.cli import stage_main
from tlpipe.splitting import split_dataset

if __name__ == "__main__":
    sys.exit(stage_main("split", ["raw", "out"], lambda p, a: split_dataset(a.raw, p.split, a.out)))
