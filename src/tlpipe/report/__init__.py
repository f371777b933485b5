"""The report stage: a self-contained HTML page and a Markdown summary of the evaluation."""
