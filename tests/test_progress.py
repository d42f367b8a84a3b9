"""flowjax.progress: a pass's log lines, their rate (without the first update's compile) and ETA, on a fake
clock. A real pass's line: tests/test_sample.py."""

import logging

from flowjax import progress


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith('pass')]


def test_logs_at_most_every_k_seconds_and_at_the_end(caplog):
    caplog.set_level(logging.INFO)
    now = [0.0]
    p = progress.Progress('pass', 100, unit='samples', every=10.0, clock=lambda: now[0])
    for t, n in ((8.0, 10), (12.0, 10), (13.0, 10), (21.0, 10), (30.0, 60)):  # the first 8 s: its compile
        now[0] = t
        p.update(n)
    # 12 s: 10 samples in the 4 s since the first update; 13 s: too soon; 21 s: 9 s after the last line
    assert _lines(caplog) == ['pass: 20/100 (20%), 2.5 samples/s, ETA 0:32',
                              'pass: 100/100 (100%), 4.09 samples/s, ETA 0:00']


def test_a_resumed_pass_and_a_single_update():
    now = [100.0]
    p = progress.Progress('pass', 50, done=20, every=10.0, clock=lambda: now[0])
    assert p.line() == 'pass: 20/50 (40%), rate unknown, ETA ?'
    now[0] = 105.0
    p.update(10)  # one update: the rate is all there is, compile included (10 items in 5 s)
    assert p.line() == 'pass: 30/50 (60%), 2 items/s, ETA 0:10'
    assert progress.duration(3725.9) == '1:02:05' and progress.duration(59) == '0:59'
