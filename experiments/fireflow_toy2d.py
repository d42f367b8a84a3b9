"""Inversion on toy 2D data (FireFlow's use): 1-RF teacher -> couplings -> 2-RF -> invert.

    python -m flowjax.main --config=experiments/fireflow_toy2d.py --workdir=runs/fireflow_moons
    python -m flowjax.main --config=experiments/fireflow_toy2d.py:runlocal --workdir=runs/quick

The teacher, its couplings and the 2-RF student are `toy2d_reflow.py`'s stages. The `invert` stage
(docs/methods.md, Inversion (method invert)) inverts held-out points to noise and regenerates them with
the analytic Gaussian flow of those points, the teacher and the student, with samplers at matched NFE
for N in NS: euler@(N+1) and fireflow@N (N + 1 per direction), midpoint@(N/2) (about N), midpoint@N
and rf_solver@N (2N), and the paired differences of their per-point errors (`pairs`).
Arguments: `runlocal` (N = 4 only), `target=` (moons, 8gaussians, ...), `count=` points inverted (256).
"""

from flowjax import configs
from flowjax.methods import table

NS = (4, 8, 16, 32)
LOCAL_NS = (4,)


def samplers(ns) -> tuple[str, ...]:
    """The invert stage's samplers, per N: euler@(N+1) and fireflow@N (N + 1 NFE per direction),
    midpoint@(N/2) (about N), midpoint@N and rf_solver@N (2N); each once."""
    specs = (f'{spec}' for n in ns for spec in (f'euler@{n + 1}', f'fireflow@{n}', f'midpoint@{max(n // 2, 1)}',
                                                 f'midpoint@{n}', f'rf_solver@{n}'))
    return tuple(dict.fromkeys(specs))


def pairs(ns) -> tuple[str, ...]:
    """The paired comparisons per N: FireFlow against Euler at equal NFE, against midpoint at about equal and at
    twice the NFE; RF-Solver against midpoint at the same NFE (equal up to rounding)."""
    return tuple(p for n in ns for p in (f'fireflow@{n}=euler@{n + 1}', f'fireflow@{n}=midpoint@{max(n // 2, 1)}',
                                         f'fireflow@{n}=midpoint@{n}', f'rf_solver@{n}=midpoint@{n}'))


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, target='moons', count=256)
    local = 'runlocal,' if arg.runlocal else ''
    recipe = configs.experiment(__file__, 'toy2d_reflow', f'{local}target={arg.target}')
    invert = table.for_method(recipe.teacher, 'invert')
    invert.invert.models = ('analytic', 'teacher', 'reflow')
    invert.invert.samplers = samplers(LOCAL_NS if arg.runlocal else NS)
    invert.invert.differences = pairs(LOCAL_NS if arg.runlocal else NS)
    invert.invert.count = arg.count
    invert.eval.num_samples = max(invert.eval.num_samples, arg.count)
    return configs.pipeline(teacher=recipe.teacher, couplings=recipe.couplings, reflow=recipe.reflow, invert=invert)
