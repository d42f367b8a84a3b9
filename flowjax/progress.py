"""Progress of a long pass outside training (sampling, feature extraction, inversion): a log line with the
count done, the rate and the time left.

    progress = Progress('evaluate teacher rk45', total=50_000, unit='samples')
    for chunk in chunks:
        ...                       # the chunk's work, finished on the host (its results fetched)
        progress.update(len(chunk))

logs through absl, at most once every `every` seconds and once at the end:

    evaluate teacher rk45: 12000/50000 (24%), 1.52e+03 samples/s, ETA 0:25

The rate counts from the end of the first update on, so the compile that usually fills the first
chunk's time is left out of it (it is in the rate only while the first update is the only one).
"""

import time
from collections.abc import Callable

from absl import logging


def duration(seconds: float) -> str:
    """'h:mm:ss' (or 'm:ss' under an hour) of a number of seconds."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


class Progress:
    """`update(n)` after each piece of a pass of `total` items; `done` items were finished before (a resumed
    pass). `clock` (seconds; time.monotonic) can be replaced in tests."""

    def __init__(self, name: str, total: int, *, done: int = 0, unit: str = 'items', every: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.name, self.total, self.done, self.unit, self.every = name, int(total), int(done), unit, every
        self._clock = clock
        self._start = self._logged = clock()
        self._start_done = self.done
        self._first: tuple[float, int] | None = None  # (time, done) at the end of the first update

    def rate(self, now: float | None = None) -> float | None:
        """Items per second since the first update (since the start while there was only one); None before any."""
        now = self._clock() if now is None else now
        if self._first is not None and self.done > self._first[1] and now > self._first[0]:
            return (self.done - self._first[1]) / (now - self._first[0])
        if self.done > self._start_done and now > self._start:
            return (self.done - self._start_done) / (now - self._start)
        return None

    def line(self, now: float | None = None) -> str:
        """The log line: 'name: done/total (pct), rate unit/s, ETA m:ss'."""
        rate = self.rate(now)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        left = max(self.total - self.done, 0)
        speed = 'rate unknown' if rate is None else f'{rate:.3g} {self.unit}/s'
        eta = duration(left / rate) if rate else ('0:00' if not left else '?')
        return f'{self.name}: {self.done}/{self.total} ({pct:.0f}%), {speed}, ETA {eta}'

    def update(self, count: int = 1) -> None:
        """`count` more items are done: logs when `every` seconds have passed since the last line, or at the end."""
        now = self._clock()
        self.done += int(count)
        if self._first is None:
            self._first = (now, self.done)
        if self.done >= self.total or now - self._logged >= self.every:
            self._logged = now
            logging.info('%s', self.line(now))
