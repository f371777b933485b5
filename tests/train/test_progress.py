"""Progress lines within an epoch, for logs that are not a terminal (dvc repro)."""

from __future__ import annotations

import logging

from tlpipe.train.progress import ProgressLog


def test_a_line_every_interval_with_rate_and_time_left(caplog):
    now = [0.0]
    callback = ProgressLog("fine-tune", batch_size=32, epochs=4, every_seconds=30, clock=lambda: now[0])
    callback.set_params({"steps": 100, "epochs": 4})
    caplog.set_level(logging.INFO, logger="tlpipe.train.progress")
    callback.on_epoch_begin(1)
    for batch in range(100):
        now[0] += 1.0  # one batch of 32 images a second
        callback.on_train_batch_end(batch, {"loss": 0.5})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # at 30, 60 and 90 s
    assert lines[0] == "fine-tune: epoch 2/4, batch 30/100 (30%), 32 img/s, epoch ETA 1m10s, loss 0.5000"
    assert lines[-1].startswith("fine-tune: epoch 2/4, batch 90/100 (90%), 32 img/s, epoch ETA 10s")


def test_without_a_step_count_it_still_reports_the_rate(caplog):
    now = [0.0]
    callback = ProgressLog("frozen", batch_size=10, epochs=1, every_seconds=5, clock=lambda: now[0])
    callback.set_params({})
    caplog.set_level(logging.INFO, logger="tlpipe.train.progress")
    callback.on_epoch_begin(0)
    now[0] = 6.0
    callback.on_train_batch_end(2)
    assert [r.getMessage() for r in caplog.records] == ["frozen: epoch 1/1, batch 3, 5 img/s"]
