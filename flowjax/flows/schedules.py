"""Annealing schedules b(k) of a training step k (SlimFlow's noise mixing, docs/methods.md, SlimFlow).

A schedule is a typed config section, never a string to parse:

    beta = {'schedule': 'linear', 'steps': 300_000, 'value': 0.0}

    linear        1 - min(1, k / steps)                 (from 1 to 0 over `steps`, the paper's default)
    exponential   exp(-k / steps)
    cosine        (1 + cos(pi * min(1, k / steps))) / 2
    constant      value                                 (0: pure reflow couplings; 1: independent noise)
"""

import dataclasses
import math

import ml_collections

from flowjax import errors

KINDS = ('linear', 'exponential', 'cosine', 'constant')


@dataclasses.dataclass(frozen=True)
class Schedule:
    """b(k) for training step k >= 0 (a Python float: schedules are evaluated on the host)."""

    kind: str
    steps: int
    value: float = 0.0

    def __call__(self, k: int) -> float:
        progress = min(1.0, k / self.steps)
        if self.kind == 'linear':
            return 1.0 - progress
        if self.kind == 'exponential':
            return math.exp(-k / self.steps)
        if self.kind == 'cosine':
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.value


def from_config(cfg: ml_collections.ConfigDict, field: str) -> Schedule:
    """The schedule a config section describes; a one-line error naming `field` otherwise."""
    kind, steps, value = cfg.get('schedule'), cfg.get('steps'), cfg.get('value', 0.0)
    if kind not in KINDS:
        raise errors.ConfigError(f"{field}.schedule={kind!r}: expected one of {', '.join(KINDS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise errors.ConfigError(f'{field}.steps={steps!r}: must be an integer >= 1 (the annealing width W)')
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise errors.ConfigError(f'{field}.value={value!r}: must be a number in [0, 1]')
    unknown = sorted(set(cfg.keys()) - {'schedule', 'steps', 'value'})
    if unknown:
        raise errors.ConfigError(f"{field}.{unknown[0]}: unknown field (expected schedule, steps, value)")
    return Schedule(kind, steps, float(value))
