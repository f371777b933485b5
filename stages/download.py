"""DVC stage `download`: bring the configured dataset in as normalised PNGs plus a manifest."""

import sys

from tlpipe.data.sources import download
from tlpipe.stage_runner import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("download", [], ["out"], lambda p, a: download(p.data, a.out)))
