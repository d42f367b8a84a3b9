"""Where training metrics go: `<workdir>/metrics.jsonl` and TensorBoard event files in `<workdir>/tensorboard`.

TensorBoard files are written by tensorboardX (protobuf only: no TensorFlow, no torch); the
evaluation job adds its sample figure there as an image.
"""

import io
import json
import time
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from etils import epath

from flowjax import progress


class TensorBoard:
    """Scalars and images in a TensorBoard event file under `logdir` (a local path, or gs:// where
    google-cloud-storage is installed)."""

    def __init__(self, logdir: str | epath.Path):
        from tensorboardX import SummaryWriter  # imported when needed

        self._writer = SummaryWriter(str(logdir), flush_secs=30)

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, float(value), int(step))

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """A uint8 image (H, W) or (H, W, C), C in 1, 3, 4."""
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise ValueError(f'TensorBoard image {tag!r}: dtype {image.dtype}, expected uint8')
        self._writer.add_image(tag, image, int(step), dataformats='HW' if image.ndim == 2 else 'HWC')

    def close(self) -> None:
        self._writer.close()


def tensorboard(workdir: str | epath.Path) -> TensorBoard | None:
    """The writer of `<workdir>/tensorboard`, or None (with a warning) where it cannot be opened:
    metrics.jsonl and the reports do not depend on it."""
    logdir = epath.Path(workdir) / 'tensorboard'
    try:
        return TensorBoard(logdir)
    except (ImportError, OSError) as e:
        logging.warning('TensorBoard: not writing to %s (%s: %s)', logdir, type(e).__name__, e)
        return None


def log_png(workdir: str | epath.Path, step: int, tag: str, png: bytes) -> None:
    """Adds a PNG (e.g. a sample figure) to `<workdir>/tensorboard` as an image (process 0 only)."""
    if jax.process_index() != 0:
        return
    from PIL import Image

    with Image.open(io.BytesIO(png)) as decoded:
        image = np.asarray(decoded.convert('RGBA' if 'A' in decoded.getbands() else 'RGB'))
    writer = tensorboard(workdir)
    if writer is not None:
        writer.image(step, tag, image)
        writer.close()


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
        self._workdir = workdir  # TensorBoard opens its event file at the first write (a finished rerun: none)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self._active:
            return
        record = {'step': int(step), 'time': round(time.time(), 3), **{k: float(v) for k, v in scalars.items()}}
        with self._path.open('a') as f:
            f.write(json.dumps(record) + '\n')
        if self._tb is None and self._workdir is not None:
            self._tb, self._workdir = tensorboard(self._workdir), None
        if self._tb is not None:
            self._tb.scalars(step, scalars)

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
