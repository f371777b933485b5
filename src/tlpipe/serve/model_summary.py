"""The model card's essentials for the upload page's side panel: name, version and alias, data, test
metrics with intervals, date, commit.

The report stage writes the card (``results/report/model_card.md``) and ``tlpipe promote --model-card``
makes it the registered version's description, so a local model and a registered one are summarised from
the same Markdown.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

DEFAULT_CARD = Path("results/report/model_card.md")
# the card's sections the panel shows, in its order
SHOWN = ("Intended use", "Data", "Test performance at the operating point", "Calibration", "Val and test")


def card_summary(markdown: str) -> dict:
    """The shown sections' bullet points, and the commit the Training section names."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
        elif current is not None and line.startswith("- "):
            sections[current].append(line[2:].strip())
    training = " ".join(sections.get("Training", []))
    commit = re.search(r"commit ([0-9a-f]{7,40})", training)
    return {
        "sections": {name: sections[name] for name in SHOWN if name in sections},
        "commit": commit.group(1) if commit else None,
    }


def _date(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def local_summary(model: Path, card: Path = DEFAULT_CARD) -> dict:
    """A ``.keras`` file's summary: the card beside the pipeline's results, when there is one."""
    summary = {
        "name": str(model),
        "version": "local file",
        "aliases": [],
        "date": _date(model.stat().st_mtime),
    }
    if card.is_file():
        return summary | card_summary(card.read_text(encoding="utf-8"))
    return summary | {
        "sections": {},
        "commit": None,
        "note": f"no model card at {card} (the report stage writes it)",
    }


def registry_summary(uri: str) -> dict:
    """A registered version's summary (``models:/NAME@alias`` or ``models:/NAME/VERSION``): its description
    is the card; other URIs get their name only."""
    import mlflow

    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", uri)
    if match is None:
        return {"name": uri, "version": None, "aliases": [], "date": None, "sections": {}, "commit": None}
    name, alias, number = match.groups()
    client = mlflow.MlflowClient()
    version = (
        client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    )
    summary = {
        "name": name,
        "version": str(version.version),
        "aliases": list(version.aliases or []),
        "date": _date(version.creation_timestamp / 1000),
    }
    return summary | card_summary(version.description or "")
