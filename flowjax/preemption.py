"""Stopping a loop cleanly on SIGTERM (a scheduler's preemption notice) or the first Ctrl-C.

The loop (training, the coupling pass) asks `watch.reached(lo, hi)` after each jit call or shard;
when it says yes, the loop saves its progress and raises `errors.Preempted`, which main reports as
one line and turns into exit status 128 + the signal (143 for SIGTERM, 130 for Ctrl-C).

One process: handlers installed only while the loop runs set a flag; the previous handlers come
back when the loop ends, so a signal elsewhere (evaluation, export) acts as it did before. The
first signal restores the default action, so a second one kills at once.

Several processes (jax.distributed): the distributed runtime's notifier owns SIGTERM (a Python
handler would replace it) and the processes agree on a step through JAX's preemption sync point,
so all of them stop after the same step. No handlers are installed; Ctrl-C acts as usual there.
"""

import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from flowjax import errors

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def describe(signum: int) -> str:
    """'preempted' for SIGTERM, 'interrupted' for Ctrl-C: how a stopped run's one-line message starts."""
    return 'interrupted' if signum == signal.SIGINT else 'preempted'


class Watch:
    """`with Watch() as watch:` around a loop; `watch.reached(lo, hi)` after it ran counters (lo, hi]."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._distributed = jax.process_count() > 1

    def __enter__(self) -> 'Watch':
        if not self._distributed and threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        for other in self._previous:
            signal.signal(other, signal.SIG_DFL)  # a second signal kills at once
        # os.write, not logging or print: this runs between two bytecodes of whatever the main thread does.
        os.write(2, f'flowjax: {signal.Signals(signum).name} received; saving after the work in flight, then '
                    'stopping (send it again to stop at once)\n'.encode())

    def reached(self, lo: int, hi: int) -> bool:
        """Whether to stop now that counters lo + 1 .. hi (steps, or shards) are done.

        With several processes, JAX sets the sync point one past the highest counter any process
        had passed when the notice came, so every counter is passed to it in order, one by one.
        """
        if not self._distributed:
            return self.signum is not None
        reached = False
        for counter in range(lo + 1, hi + 1):
            reached = _sync_point(counter) or reached
        if reached:
            self.signum = signal.SIGTERM
        return reached


def _sync_point(counter: int) -> bool:
    try:
        return multihost_utils.reached_preemption_sync_point(counter)
    except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
        return False


def anywhere(flag: bool) -> bool:
    """Whether `flag` is set in any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def stop_if_asked(watch: Watch, where: str, saved: str) -> None:
    """Raises errors.Preempted in every process when a stop was asked for in any of them (a collective:
    every process calls it, also one that finished its own part): `where` names the pass, `saved` what
    is on disk for a rerun to resume from."""
    if anywhere(watch.signum is not None):
        signum = watch.signum or signal.SIGTERM
        raise errors.Preempted(f'{describe(signum)} in {where}; {saved}; rerun the same command to resume', signum)
