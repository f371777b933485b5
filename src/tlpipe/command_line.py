"""The command line: ``tlpipe``, one entry point with a subcommand per tool.

Each subcommand's module exposes ``add_arguments(parser)`` and ``run(args) -> int``;
it is imported only when named, so ``tlpipe predict`` does not pay for MLflow's
registry code and ``tlpipe promote`` does not load image decoders.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from tlpipe.core.errors import PipelineError
from tlpipe.core.logs import show_progress

logger = logging.getLogger(__name__)

# name -> (module, one-line help)
COMMANDS = {
    "app": ("tlpipe.serve.app", "a local web page to upload images and see the model's answers"),
    "export": (
        "tlpipe.serve.export",
        "write the model with its decision and guard as ONNX or OpenVINO IR, checked against Keras",
    ),
    "pr-report": (
        "tlpipe.ops.pr_report",
        "dvc pull, dvc repro, then params and metrics diffs against the base: a pull request's summary",
    ),
    "predict": ("tlpipe.serve.predict", "classify image files or folders; CSV to stdout or --out"),
    "promote": (
        "tlpipe.ops.registry",
        "register the evaluated model as challenger; promote it to champion if it wins",
    ),
    "recipe": ("tlpipe.ops.recipes", "write a dataset recipe (recipes/NAME.yaml) into params.yaml"),
    "retrain": (
        "tlpipe.ops.retrain",
        "dvc pull, dvc repro, promotion gate, dvc push: the scheduled retraining job",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="tlpipe", description="tlpipe command-line tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    # parse only the command name here; the command's own parser takes the rest
    known, _ = parser.parse_known_args(argv[:1] or argv)
    module = importlib.import_module(COMMANDS[known.command][0])
    sub = argparse.ArgumentParser(prog=f"tlpipe {known.command}", description=COMMANDS[known.command][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    show_progress(info_stream=sys.stderr)  # stdout carries the command's data: a CSV, a summary
    try:
        return module.run(args)
    except (PipelineError, FileNotFoundError) as err:
        logger.error("tlpipe %s: error: %s", known.command, err)
        return 1
