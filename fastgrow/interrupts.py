"""Stop a training run cleanly on SIGINT (Ctrl-C) or SIGTERM: finish the current step, save, exit.

`StopSignals` is a context manager for the training loop. The first SIGINT or SIGTERM only sets a flag
(the loop checks it between steps, writes a checkpoint of the current step and returns); a second SIGINT
raises KeyboardInterrupt at once, even in the middle of a checkpoint write (whose temp folder is then
removed, so the previous checkpoint stays the newest). A second SIGTERM is ignored: schedulers follow it
with SIGKILL, which the checkpoint protocol survives anyway.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    @property
    def hit(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __enter__(self) -> StopSignals:
        for s in _SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave the default handlers
                break
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if self.echo:
            again = " (Ctrl-C again to exit at once)" if signum == signal.SIGINT else ""
            print(
                f"\nfastgrow: {signal.Signals(signum).name}: saving a checkpoint after this step{again}",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
