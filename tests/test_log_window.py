"""LogWindow: what a train record reports for a logging window (the loop's and G_learn's)."""

from __future__ import annotations

import math

import torch

from fastgrow.train_base import LogWindow


def _add(w: LogWindow, loss: float, bad: bool, tokens: int = 10) -> None:
    w.add(torch.tensor(loss), torch.tensor(bad), tokens)


def test_mean_loss_counts_the_good_steps_only():
    w = LogWindow(torch.device("cpu"))
    _add(w, 2.0, False)
    _add(w, float("nan"), True)  # a skipped step: its loss must not reach the mean
    _add(w, float("inf"), True)
    _add(w, 4.0, False)
    loss, n_bad, tps = w.summary()
    assert (loss, n_bad) == (3.0, 2)
    assert w.steps == 4 and w.tokens == 40 and math.isfinite(tps) and tps > 0


def test_a_window_of_skipped_steps_has_no_loss_and_reset_starts_over():
    w = LogWindow(torch.device("cpu"))
    _add(w, float("nan"), True)
    loss, n_bad, _ = w.summary()
    assert math.isnan(loss) and n_bad == 1
    w.reset()
    _add(w, 5.0, False, tokens=7)
    assert w.summary()[:2] == (5.0, 0) and (w.steps, w.tokens) == (1, 7)


def test_paused_time_is_kept_out_of_tokens_per_second():
    w = LogWindow(torch.device("cpu"))
    _add(w, 1.0, False, tokens=1000)
    w.start -= 2.0  # the window began 2 s ago ...
    w.paused = 1.0  # ... of which 1 s was evaluation / checkpointing
    tps = w.summary()[2]
    assert 900 < tps < 1000  # 1000 tokens over ~1 s (plus the few microseconds of this test)
