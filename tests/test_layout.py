"""The package's shape: small modules, the map in docs/architecture.md true to the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "tlpipe"
MAX_LINES = 400
MAP = (REPO / "docs" / "architecture.md").read_text()


@pytest.mark.parametrize("module", sorted(p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")))
def test_every_module_reads_in_one_sitting(module):
    lines = len((SRC / module).read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it along its seams"


def test_every_subpackage_is_on_the_map_and_every_package_on_the_map_exists():
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    on_map = set(re.findall(r"^\| `tlpipe\.(\w+)` \|", MAP, flags=re.M))
    assert packages == on_map


def test_every_module_the_map_names_exists():
    for package, cell in re.findall(r"^\| `tlpipe\.(\w+)` \| (.*?) \|", MAP, flags=re.M):
        for module in re.findall(r"`(\w+)`", cell):
            assert (SRC / package / f"{module}.py").is_file(), (
                f"docs/architecture.md names {package}.{module}"
            )


def test_the_layers_in_the_docs_are_the_enforced_contract():
    pyproject = (REPO / "pyproject.toml").read_text()
    enforced = re.search(r"layers = \[(.*?)\]", pyproject, flags=re.S).group(1)
    enforced_layers = [line.strip().strip('",').replace("tlpipe.", "") for line in enforced.splitlines()]
    documented = re.search(r"```\n\s*(command_line.*?)\n\s*```", MAP, flags=re.S).group(1)
    assert [x for x in enforced_layers if x] == [line.strip() for line in documented.splitlines()]
