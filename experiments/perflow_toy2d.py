"""PeRFlow on toy 2D data: 1-RF teacher -> PeRFlow students with K = 4 and K = 1 windows -> evaluate.

    python -m flowjax.main --config=experiments/perflow_toy2d.py --workdir=runs/perflow_moons
    python -m flowjax.main --config=experiments/perflow_toy2d.py:target=8gaussians --workdir=runs/perflow_8g
    python -m flowjax.main --config=experiments/perflow_toy2d.py:runlocal --workdir=runs/quick

The teacher is `toy2d_reflow.py`'s 1-RF stage. Both students (docs/methods.md, PeRFlow) start from
the teacher's weights, train on the teacher's trajectories solved per batch with the same teacher
budget over [0, 1] (32 Euler steps: euler@8 in each of 4 windows, euler@32 in the one window of
K = 1, which is online reflow on the teacher's couplings), the same steps and learning rate. The
evaluate stage scores the three models with Euler at 1, 2, 4 and 8 steps; a PeRFlow student raises
N to K (its euler@1 and euler@2 cost 4 NFE with K = 4) and spreads the steps over its windows.
Arguments: `runlocal`, `target=` (moons, 8gaussians, ...), `seed=` (0), `steps=` (student steps; 3000).
"""

from flowjax import configs
from flowjax.methods import table

SAMPLERS = ('euler@1', 'euler@2', 'euler@4', 'euler@8')
TEACHER_STEPS = 32  # the teacher's Euler steps over [0, 1], split over the windows


def perflow_stage(teacher, windows: int, *, steps: int, seed: int = 0):
    """A PeRFlow student of the teacher stage: the same data and model, K = `windows`, the teacher
    solved with TEACHER_STEPS / K Euler steps per window."""
    c = table.for_method(teacher, 'perflow')
    c.perflow.update(teacher='teacher', windows=windows, teacher_sampler=f'euler@{TEACHER_STEPS // windows}')
    c.train.steps = steps
    c.train.lr = 1e-3
    c.seed = seed
    return c


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, target='moons', seed=0, steps=0)
    recipe = configs.experiment(__file__, 'toy2d_reflow', ('runlocal,' if arg.runlocal else '') + f'target={arg.target}')
    teacher = recipe.teacher
    steps = arg.steps or (40 if arg.runlocal else 3000)
    students = {f'perflow_k{k}': perflow_stage(teacher, k, steps=steps, seed=arg.seed) for k in (4, 1)}

    evaluate = recipe.evaluate
    evaluate.eval.models = ('teacher', *students)
    evaluate.eval.couplings = None
    evaluate.eval.samplers = SAMPLERS
    return configs.pipeline(teacher=teacher, **students, evaluate=evaluate)
