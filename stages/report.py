"""DVC stage `report`: a self-contained HTML report and a Markdown summary."""

import sys

from tlpipe.stage_runner import stage_main
from tlpipe.report.reporting import report_stage

if __name__ == "__main__":
    sys.exit(
        stage_main(
            "report",
            [
                "evaluation",
                "frozen-history",
                "fine-history",
                "augmented",
                "model",
                "split-summary",
                "quarantine",
            ],
            ["html", "markdown"],
            report_stage,
        )
    )
