"""DVC stage `report`: a self-contained HTML report, a Markdown summary and the model card."""

import sys

from tlpipe.report.stage import report_stage
from tlpipe.stage_runner import stage_main

INPUTS = ["evaluation", "frozen-history", "fine-history", "augmented", "model", "split-summary", "quarantine"]
OUTPUTS = ["html", "markdown", "model-card"]

if __name__ == "__main__":
    sys.exit(stage_main("report", INPUTS, OUTPUTS, report_stage))
