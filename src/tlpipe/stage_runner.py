"""The stage runner: shared plumbing for the thin stage scripts in ``stages/``.

Each script hands :func:`stage_main` its path options and one library function; this
module parses the command line, validates params, opens the stage's MLflow context and
turns the errors a user can act on into one line and an exit status.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tlpipe.core import tracking
from tlpipe.core.config import Params, flat_params, load_params
from tlpipe.core.errors import PipelineError
from tlpipe.core.logs import show_progress

logger = logging.getLogger(__name__)

# errors a user can fix from the message alone: shown without a traceback
USER_ERRORS = (PipelineError, FileNotFoundError)

# OSErrors that are the machine's, not the code's: each with what to do about it
ENVIRONMENT_ERRNOS = {
    errno.EACCES: "check the folder's permissions, or write somewhere else",
    errno.EPERM: "check the folder's permissions, or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.ENOSPC: "free some disk space and rerun",
    errno.EDQUOT: "free some of your disk quota and rerun",
    errno.EEXIST: "a file stands where a folder is needed",
    errno.ENOTDIR: "a file stands where a folder is needed",
    errno.EISDIR: "a folder stands where a file is needed",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that ``finally`` blocks run.

    Python's default is to die on the spot: scratch folders would stay behind and
    the stage's MLflow run would stay marked as running.
    """


@contextmanager
def sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set a handler (and receives signals)
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def environment_error(err: OSError) -> str | None:
    """A one-line message for a full disk, a read-only folder and the like; None for other OSErrors."""
    hint = None if err.errno is None else ENVIRONMENT_ERRNOS.get(err.errno)
    if hint is None:
        return None
    where = f": {err.filename}" if err.filename else ""
    return f"{err.strerror or err}{where} ({hint})"


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
    show_progress()
    try:
        with sigterm_raises():
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
        logger.error("%s: error: %s", stage, err)
        return 1
    except OSError as err:
        message = environment_error(err)
        if message is None:
            raise
        logger.error("%s: error: %s", stage, message)
        return 1
    except Terminated:
        # outputs are written to a scratch name and renamed at the end: none is half-written
        logger.error("%s: terminated (SIGTERM); rerun it (dvc repro) to finish", stage)
        return 128 + signal.SIGTERM
    return 0
