"""Training progress that reads well in a log: under ``dvc repro`` output is no terminal, so Keras's
progress bar is off and an epoch shows nothing for minutes. This callback logs one line every
``every_seconds`` within an epoch: the batch, the images per second and the epoch's time left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import keras

logger = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressLog(keras.callbacks.Callback):
    """``prefix: epoch E/N, batch B/T (P%), X img/s, epoch ETA Ym`` every ``every_seconds``."""

    def __init__(
        self,
        prefix: str,
        batch_size: int,
        epochs: int,
        every_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        self.prefix, self.batch_size, self.epochs = prefix, batch_size, epochs
        self.every, self.clock = every_seconds, clock
        self.epoch = 0
        self.started = self.last = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch
        self.started = self.last = self.clock()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        done = batch + 1
        total = (self.params or {}).get("steps")
        rate = done * self.batch_size / max(now - self.started, 1e-9)
        where = f"batch {done}" + (f"/{total} ({100 * done / total:.0f}%)" if total else "")
        left = f", epoch ETA {_duration((total - done) * self.batch_size / rate)}" if total else ""
        loss = (logs or {}).get("loss")
        shown_loss = "" if loss is None else f", loss {float(loss):.4f}"
        logger.info(
            f"{self.prefix}: epoch {self.epoch + 1}/{self.epochs}, {where}, {rate:.0f} img/s{left}{shown_loss}"
        )
