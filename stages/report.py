"""DVC stage `report`: a self-contained HTML report and a Markdown summary."""

import sys

from tlpipe.cli import stage_main
from tlpipe.reporting import write_report

if __name__ == "__main__":
    sys.exit(
        stage_main(
            "report",
            ["metrics", "roc", "frozen-history", "fine-history", "html", "markdown"],
            lambda p, a: write_report(
                a.metrics, a.roc, a.frozen_history, a.fine_history, p, a.html, a.markdown
            ),
        )
    )
