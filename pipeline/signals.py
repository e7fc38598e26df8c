"""Pre-emption signals: SIGTERM, SIGUSR1 and SIGUSR2 (what SLURM and submitit send at a pre-emption or a time
limit) save a checkpoint at the signal, in every phase of a run, and then end the process with a non-zero code.

``Guard`` installs one handler for the three signals while a run trains, evaluates and measures latency:

* training: the handler only notes the signal; ``Checkpointing`` saves at the end of the current optimizer step and
  raises ``Preempted`` (raising inside a step would leave the optimizer half-updated);
* evaluation and latency (the weights no longer change): the handler raises ``Preempted`` at once, and the run saves
  the trained state before it leaves, so the relaunch skips straight to evaluation.

The handler that was installed before (submitit's checkpoint-and-requeue for its signal) is kept: ``forward`` calls
it once the checkpoint is on disk, so a requeue resubmits a job that resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# Phases in which the handler raises at once (nothing changes the weights); in the others (training, saving a
# checkpoint, writing the record) it notes the signal, acted on at the next safe point.
RAISE_IN = ("setup", "evaluation", "latency")


class Preempted(BaseException):
    """The run received a pre-emption signal; its checkpoint (``checkpoint``) was saved at the signal."""

    def __init__(self, signum: int, phase: str):
        super().__init__(f"{signal.Signals(signum).name} during {phase}")
        self.signum, self.phase = signum, phase
        self.checkpoint = None
        self.step = None
        self.tokens = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class Guard:
    """Handlers for ``SIGNALS`` while a run is in progress (restored on exit); ``phase`` says what it is doing."""

    def __init__(self):
        self.signum: int | None = None
        self.phase = "setup"
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "Guard":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.getsignal(s) for s in SIGNALS}
            self.reclaim()
        return self

    def reclaim(self) -> None:
        """Install our handler for ``SIGNALS`` (again, taking them back from a handler installed after ours).
        Lightning's ``Trainer.fit`` installs its own SIGTERM handler, which under DDP runs a broadcast inside the
        signal handler: with both ranks signalled at different points of a step, the ranks wait in different
        collectives and the job hangs. Ours only notes the signal; ``Checkpointing`` acts on it at a step end that
        every rank agrees on."""
        if self.previous and threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                signal.signal(s, self._handler)

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def _handler(self, signum, frame) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if first and self.phase in RAISE_IN:
            raise Preempted(signum, self.phase)

    def check(self) -> None:
        """Raise ``Preempted`` if a signal arrived (at a point where the state can be saved)."""
        if self.signum is not None:
            raise Preempted(self.signum, self.phase)

    def forward(self, signum: int) -> None:
        """Call the handler that was installed before ours (e.g. submitit's requeue), if it is a function."""
        handler = self.previous.get(signum)
        if callable(handler):
            handler(signum, None)


def forward(signum: int) -> None:
    """Once the run has saved and its guard is gone: call the handler now installed for ``signum`` if it is a
    function (submitit's checkpoint-and-requeue in a submitit job; nothing in a plain run)."""
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, None)


# The guard of the run in progress in this process (Checkpointing reads it at every step).
current: Guard | None = None
