"""DVC stage `report`: a self-contained HTML report and a Markdown summary."""

import sys

from tlpipe.cli import stage_main
from tlpipe.reporting import report_stage

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
