"""DVC stage `download`: bring the configured dataset in as normalised PNGs plus a manifest."""

import sys

from tlpipe.cli import stage_main
from tlpipe.sources import download

if __name__ == "__main__":
    sys.exit(stage_main("download", [], ["out"], lambda p, a: download(p.data, a.out)))
