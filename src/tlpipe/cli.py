"""Shared plumbing for the thin stage scripts in ``stages/``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tlpipe import tracking
from tlpipe.config import Params, flat_params, load_params
from tlpipe.errors import PipelineError

# errors a user can fix from the message alone: shown without a traceback
USER_ERRORS = (PipelineError, FileNotFoundError)


def stage_main(
    stage: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    run: Callable[[Params, argparse.Namespace], object],
    argv: Sequence[str] | None = None,
    state: Sequence[str] = (),
) -> int:
    """Parse ``--params`` and the stage's path options, validate params, run the stage.

    ``inputs`` and ``outputs`` name the path options the stage reads and writes
    (digested for MLflow lineage); ``state`` names ones that are neither, such as
    a checkpoint folder.
    """
    parser = argparse.ArgumentParser(prog=f"stages/{stage.replace('-', '_')}.py")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    for name in [*inputs, *outputs, *state]:
        parser.add_argument(f"--{name}", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        tracking.check_reachable()  # before any work: nothing is written if the server is down
        tracking.set_stage_context(
            tracking.StageContext(
                params=flat_params(params),
                inputs=[getattr(args, name.replace("-", "_")) for name in inputs],
                outputs=[getattr(args, name.replace("-", "_")) for name in outputs],
            )
        )
        run(params, args)
    except USER_ERRORS as err:
        print(f"{stage}: error: {err}", file=sys.stderr)
        return 1
    return 0
