"""What a report page is made of: sections of paragraphs, tables, figures and image cards.

These are plain values (text, numbers as shown, ``data:`` URIs); the Jinja template
``templates/report.html.j2`` decides the markup and escapes every one of them, so no
module of the report writes HTML itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Paragraph:
    text: str
    css_class: str = ""
    kind: ClassVar[str] = "paragraph"


@dataclass(frozen=True)
class Table:
    """A header row, then the body rows; every cell text as shown."""

    rows: list[list[str]]
    css_class: str = ""
    kind: ClassVar[str] = "table"


@dataclass(frozen=True)
class Figure:
    """One image: its alt text and its ``data:`` URI."""

    alt: str
    uri: str
    css_class: str = ""
    kind: ClassVar[str] = "figure"


@dataclass(frozen=True)
class FigureRow:
    """Figures side by side, wrapping on a narrow page."""

    figures: list[Figure]
    kind: ClassVar[str] = "figure_row"


@dataclass(frozen=True)
class Heading:
    text: str
    kind: ClassVar[str] = "heading"


@dataclass(frozen=True)
class Preformatted:
    text: str
    kind: ClassVar[str] = "preformatted"


@dataclass(frozen=True)
class Prediction:
    """A card's caption for a test image: its true class, the predicted one and that class's probability."""

    truth: str
    predicted: str
    probability: str  # as shown: "0.900", or "n/a" when predictions.csv lacks it


@dataclass(frozen=True)
class Card:
    """A thumbnail with its caption; without a picture the ``missing`` text stands in its place."""

    picture: Figure | None
    caption: Prediction | str
    missing: str = ""


@dataclass(frozen=True)
class Gallery:
    cards: list[Card]
    kind: ClassVar[str] = "gallery"


@dataclass(frozen=True)
class CamPanel:
    """One test image's Grad-CAM panel: ``outcome`` is "correct" or "wrong", which sets its colour."""

    outcome: str
    cards: list[Card]


@dataclass(frozen=True)
class CamPanels:
    panels: list[CamPanel]
    kind: ClassVar[str] = "cam_panels"


Block = Paragraph | Table | Figure | FigureRow | Heading | Preformatted | Gallery | CamPanels


@dataclass(frozen=True)
class Section:
    """One section of the page, linked from the navigation at the top by its anchor."""

    anchor: str
    title: str
    blocks: list[Block]
