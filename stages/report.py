"""DVC stage `report`: a self-contained HTML report and a Markdown summary."""

import sys

from tlpipe.report.stage import report_stage
from tlpipe.stage_runner import stage_main

INPUTS = ["evaluation", "frozen-history", "fine-history", "augmented", "model", "split-summary", "quarantine"]
OUTPUTS = ["html", "markdown"]

if __name__ == "__main__":
    sys.exit(stage_main("report", INPUTS, OUTPUTS, report_stage))
