"""Growth inside the training loop: the growth event, the re-setup of the step, and the growth record.

The record of a growth (metrics.jsonl `kind: "growth"`) carries `stall_seconds`: the wall time from the
end of the last step before growth to the end of the first step after it. It includes the two
validation passes of the event (`val_seconds`, also in the record: subtract it for the stall training
itself sees), grow() (`grow_seconds`), G_learn's training of its maps, the re-setup of the step and
any compilation of the first step. The end of the last step is taken after a device synchronisation
at the start of the event (its logging, and an evaluation or checkpoint due at that step, are the
run's, not the growth's), the end of the first step after another one. Growths due at the same step
share one stall (each of their records carries it). A run that stops between the growth and that step
(only possible when a later stage at the same step pauses inside G_learn's training) writes the held
records before its checkpoint, with stall_seconds None.

So a growth record can only be written one step after the growth: it is held until the first step
after it has finished and written right after that step, before the step's own train record and
before any checkpoint, so metrics.jsonl holds it exactly once (a checkpoint counts the records written
so far, and a resume from a checkpoint before the growth grows and writes it again).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fastgrow.grow_event import GrowthContext, run_growth_event
from fastgrow.metrics import MetricsLog, mfu
from fastgrow.state import sync_device
from fastgrow.train_base import autocast


class RunnerGrowth:
    """The growth half of fastgrow.runner.Runner (a mixin: it uses the runner's state and methods)."""

    pending_growth: list[dict[str, Any]]  # records held until the end of the first step after growth
    stall_start: float  # perf_counter at the end of the last step before growth

    def grow_stage(self, log: MetricsLog, stage: int) -> None:
        """Grow by stage `stage` now; its record waits for the end of the next step (module doc)."""
        if not self.pending_growth:  # the first growth at this step: the last step ends when its kernels do
            sync_device(self.device)
            self.stall_start = time.perf_counter()
        before = self.state
        # Throughput before growth: the last few logged windows (the very first one includes warm-up).
        recent = [r["tokens_per_s"] for r in self.records if r["kind"] == "train"][1:][-5:]
        tps_before = sum(recent) / len(recent) if recent else None
        params_before = before.model.num_params()
        layers_before = before.model.cfg.n_layers
        flops_tok_before = self.flops_tok
        ctx = GrowthContext(
            cfg=self.cfg,
            stage=stage,
            loader=self.loader,
            evaluate=self._val_loss,
            device=self.device,
            autocast=lambda: autocast(self.cfg, self.device),
            save=lambda: self._save(torch.full((), float(self.state.bad_steps))),
            should_stop=lambda step: step >= self.stop or self.stop_signal.hit,
            emit=lambda r: self._emit(log, r),
            progress=self.report.step,
        )
        self.state, event = run_growth_event(before, ctx)
        self._setup_model(old=before.model)
        rec = {
            "kind": "growth",
            "step": self.state.step,
            "tokens": self.state.tokens,
            "flops": self._flops_so_far(),
            "op": self.cfg.growth[stage].op,
            "stage": stage,
            "layers_before": layers_before,
            "layers_after": self.state.model.cfg.n_layers,
            "params_before": params_before,
            "params_after": self.state.model.num_params(),
            "grow_seconds": event["grow_seconds"],
            "val_seconds": event["val_seconds"],
            "stall_seconds": None,  # set at the end of the first step after growth
            "val_loss_before": event["val_loss_before"],
            "val_loss_after": event["val_loss_after"],
            "tokens_per_s_before": tps_before,
            "mfu_before": mfu(flops_tok_before, tps_before, self.peak) if tps_before else None,
        }
        rec.update({k: v for k, v in event.items() if k not in rec})  # an operator's own keys (G_learn's)
        self.pending_growth.append(rec)

    def growth_step_done(self, log: MetricsLog, stepped: bool = True) -> None:
        """After the first step after growth: the stall is known, write the held growth records.
        stepped=False: the run stops before that step (a later stage of the same step paused in G_learn's
        training, and the state is checkpointed now): the records are written with stall_seconds None,
        so the checkpoint counts them."""
        if not self.pending_growth:
            return
        sync_device(self.device)
        stall = time.perf_counter() - self.stall_start if stepped else None
        for rec in self.pending_growth:
            rec["stall_seconds"] = stall
            self._emit(log, rec)
        self.pending_growth = []
