"""Simple ReFlow's training options on the embedded 8x8 digits (docs/methods.md, Simple ReFlow).

    python -m flowjax.main --config=experiments/simple_reflow_digits.py --workdir=runs/simple_reflow
    python -m flowjax.main --config=experiments/simple_reflow_digits.py:runlocal --workdir=runs/quick

The teacher and couplings of `digits_reflow.py` with the teacher trained at dropout 0.1, then two
students initialised from it on the same couplings and step budget: `reflow` (2-RF, the teacher's
dropout) and `simple` with the options the paper pins down: per-sample loss normalisation
`L / stopgrad(L)`, the time density proportional to 10^{t_noise} (read as t_noise = 1 - t: more
training near noise), no dropout for the student, and forward pairs: stage `forward_pairs` inverts as
many real digits as there are couplings with the teacher, and half of every batch of `simple`
comes from them (`reflow.mix_couplings`, `reflow.mix_fraction = 0.5`; the paper's ratio is not
known). Both are scored with `fd_digits` at 1, 2 and 4 Euler steps and with Heun on EDM's rho = 7
time grid (`heun@4:edm`, 8 NFE). The high-pass loss and projected pairs are not implemented
(their computation is not known).
Arguments: `runlocal`, and `digits_reflow.py`'s `nf=`, `pairs=`, `steps=`.
"""

from flowjax import configs
from flowjax.methods import table


def simple_reflow_options(c, *, dropout: float = 0.0):
    """Simple ReFlow's pinned-down choices on a reflow stage `c` (in place)."""
    c.flow.update(normalize=True, time='exp10')
    c.model.dropout = dropout
    return c


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, nf=16, pairs=3000, steps=2000)
    recipe = configs.experiment(__file__, 'digits_reflow',
                                ','.join(['runlocal'] * arg.runlocal + [f'nf={arg.nf}', f'pairs={arg.pairs}',
                                                                        f'steps={arg.steps}']))
    recipe.teacher.model.dropout = 0.1
    reflow = recipe.reflow
    reflow.model.dropout = 0.1
    forward = table.for_method(recipe.couplings, 'generate')
    forward.generate.direction = 'forward'  # real digits -> noise by the teacher
    simple = simple_reflow_options(table.for_method(reflow, 'reflow'))
    simple.reflow.update(mix_couplings='forward_pairs', mix_fraction=0.5)
    evaluate = recipe.evaluate
    evaluate.eval.models = ('teacher', 'reflow', 'simple')
    evaluate.eval.samplers = ('euler@1', 'euler@2', 'euler@4', 'heun@4:edm')
    return configs.pipeline(teacher=recipe.teacher, couplings=recipe.couplings, forward_pairs=forward, reflow=reflow,
                            simple=simple, evaluate=evaluate)
