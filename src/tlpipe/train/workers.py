"""Which worker of a multi-worker cluster this process is, and where it may write.

``distribution: multi_worker`` trains one model on several processes, each started with
the same stage command and its own ``TF_CONFIG`` (the cluster's addresses and which
task this process is). Every worker runs every step on its share of each global batch
(``batch_size`` is the global batch) and the gradients are summed across workers, so all
hold the same weights. One of them, the chief, speaks for the cluster: the ``chief`` task,
or worker 0 when the cluster names no chief. Only the chief writes the stage's outputs
(the model, the history, the checkpoint folder that DVC tracks) and logs to MLflow.

The other workers run the same code, so that every collective operation comes in the same
order on every worker, but write into a scratch folder of their own that is deleted when
the stage ends: on a machine shared with the chief they never touch its files (the
feature and activation caches included), and on a machine of their own they leave
nothing for DVC to find.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tlpipe.core.errors import PipelineError
from tlpipe.train.checkpoints import Checkpoint, TrainingState

logger = logging.getLogger(__name__)

TF_CONFIG = "TF_CONFIG"


@dataclass(frozen=True)
class Worker:
    task_type: str = "worker"
    index: int = 0
    count: int = 1  # training workers in the cluster, the chief included
    is_chief: bool = True

    def describe(self) -> str:
        role = "chief" if self.is_chief else "not the chief: writes only to a scratch folder, logs nothing"
        return f"{self.task_type} {self.index} of {self.count} workers ({role})"


def this_worker(distribution: str, environ: Mapping[str, str] = os.environ) -> Worker:
    """This process's place in the cluster: ``TF_CONFIG`` under ``distribution: multi_worker``.

    Without it (or with any other distribution) the process is a cluster of one, its own chief.
    """
    raw = environ.get(TF_CONFIG) if distribution == "multi_worker" else None
    if not raw:
        return Worker()
    try:
        config = json.loads(raw)
        cluster = config.get("cluster") or {}
        task_type = str(config["task"]["type"])
        index = int(config["task"]["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise PipelineError(
            f'{TF_CONFIG} is not a cluster spec: {err!r}; expected {{"cluster": {{"worker": '
            '["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}'
        ) from None
    count = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    chief = ("chief", 0) if cluster.get("chief") else ("worker", 0)
    return Worker(task_type, index, max(count, 1), (task_type, index) == chief)


@contextmanager
def outputs_of(worker: Worker) -> Iterator[Callable[[Path], Path]]:
    """Where this worker writes each of its outputs.

    The chief writes to the paths themselves; any other worker to the same file names in
    a scratch folder of its own, deleted when the block ends.
    """
    if worker.is_chief:
        if worker.count > 1:
            logger.info(worker.describe())
        yield Path
        return
    with tempfile.TemporaryDirectory(prefix=f"tlpipe-{worker.task_type}{worker.index}-") as scratch:
        logger.info(f"{worker.describe()}: {scratch}")
        numbers = itertools.count()

        def redirect(path: Path) -> Path:
            return Path(scratch, str(next(numbers)), Path(path).name)

        yield redirect


def start_state(checkpoint: Checkpoint, worker: Worker) -> TrainingState:
    """The state a training phase starts from: its checkpoint's, to resume, for a cluster of one.

    Several workers start afresh: the others have no checkpoint to resume from (theirs was
    scratch), and workers that begin at different epochs would wait on each other forever.
    """
    if worker.count > 1:
        checkpoint.clear()
        return TrainingState(checkpoint.fingerprint)
    return checkpoint.load_state() or TrainingState(checkpoint.fingerprint)
