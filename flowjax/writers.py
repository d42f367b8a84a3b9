"""Where training metrics go: `<workdir>/metrics.jsonl` always, TensorBoard when TensorFlow is installed."""

import importlib.util
import json
import time

import jax
from absl import logging
from etils import epath

from flowjax import progress


def _tensorboard_writer(workdir: epath.Path):
    """clu's summary writer, only if TensorFlow is importable (it is an optional extra)."""
    if importlib.util.find_spec('tensorflow') is None:
        return None
    from clu import metric_writers  # imports TensorFlow

    return metric_writers.SummaryWriter(str(workdir / 'tensorboard'))


class MetricsWriter:
    """Appends one JSON object a line; on resume, drops lines past the restored step (and a last
    line that a kill cut short)."""

    def __init__(self, workdir: str | epath.Path, *, resume_step: int = 0):
        self._active = jax.process_index() == 0
        self._path = epath.Path(workdir) / 'metrics.jsonl'
        self._tb = None
        if not self._active:
            return
        if self._path.exists():  # keep only what the restored checkpoint had already seen
            kept = [line for line in self._path.read_text().splitlines() if _step(line, resume_step + 1) <= resume_step]
            tmp = self._path.parent / (self._path.name + '.tmp')
            tmp.write_text(''.join(line + '\n' for line in kept))
            tmp.replace(self._path)
        self._tb = _tensorboard_writer(epath.Path(workdir))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self._active:
            return
        record = {'step': int(step), 'time': round(time.time(), 3), **{k: float(v) for k, v in scalars.items()}}
        with self._path.open('a') as f:
            f.write(json.dumps(record) + '\n')
        if self._tb is not None:
            self._tb.write_scalars(step, scalars)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _step(line: str, unreadable: int) -> int:
    """The step of a metrics line; `unreadable` for a blank line or one a kill cut short."""
    try:
        return int(json.loads(line).get('step', 0))
    except (ValueError, AttributeError):
        return unreadable


class Progress:
    """Logs step, rate and ETA every time it is called."""

    def __init__(self, total_steps: int, start_step: int):
        self._total = total_steps
        self._last_step = start_step
        self._last_time = time.monotonic()

    def __call__(self, step: int, scalars: dict[str, float]) -> float:
        now = time.monotonic()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        eta = (self._total - step) / max(rate, 1e-9)
        shown = '  '.join(f'{k} {v:.4g}' for k, v in scalars.items())
        logging.info('step %d/%d  %s  %.1f steps/s  ETA %s', step, self._total, shown, rate, progress.duration(eta))
        return rate
