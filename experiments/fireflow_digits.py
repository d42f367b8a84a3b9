"""FireFlow on the embedded 8x8 digits (no download): inversion at matched NFE, class editing, guidance.

    python -m flowjax.main --config=experiments/fireflow_digits.py --workdir=runs/fireflow_digits
    python -m flowjax.main --config=experiments/fireflow_digits.py:runlocal --workdir=runs/quick

Per seed s (0 .. seeds-1): a class-conditional rectified-flow teacher (`teacher_s<s>`,
digits_reflow.py's recipe with `model.num_classes` 10 and `model.label_dropout` 0.1, so it also
learns the null label classifier-free guidance needs), its couplings (`couplings_s<s>`, labels drawn
uniformly, guidance 1) and its 2-RF student (`reflow_s<s>`, the recipe's reflow stage, from the
teacher's weights, conditional too).

`invert` (method invert, docs/methods.md, Inversion) inverts held-out digits with their labels and
regenerates them, for the analytic Gaussian flow (exact answer known) and every teacher and student,
with Euler, midpoint, RF-Solver and FireFlow at matched NFE: for N in SIZES, fireflow@N (N + 1 NFE
per direction) beside euler@(N + 1) (equal NFE), midpoint@(N / 2) (about equal) and midpoint@N /
rf_solver@N (about twice). Its report gives the reconstruction error per model and sampler and the
paired differences over the inverted digits (`invert.differences`); `invert/inversion.png` shows them.

`edit_s<s>` (method edit, docs/methods.md, Editing) inverts held-out digits with their own label
(guidance 1) and regenerates each with every class label at guidance 1, 2 and 3, 8 steps of each
editing sampler; `edit_s<s>/edit.png` is the grid (sources / edits to each class) and its report the
target-class accuracy by the shipped digits classifier and PSNR / RMSE to the source.

`evaluate` scores every teacher and student by fd_digits at 1, 4 and 32 Euler steps and FireFlow's 4.
Arguments: `runlocal`, `seeds=` (3), `steps=` (teacher steps, the recipe's 2000), `count=` (digits
inverted, 256).
"""

import copy

from flowjax import configs
from flowjax.methods import table

SIZES = (4, 8, 16, 32)  # FireFlow's step counts N in the inversion table
EDIT_SAMPLERS = ('euler@8', 'midpoint@8', 'fireflow@8')
EDIT_GUIDANCE = (1.0, 2.0, 3.0)
CLASSES = 10
LABEL_DROPOUT = 0.1


def _conditional(stage, seed):
    """A copy of a recipe stage with the class-conditional network that guidance needs, seeded."""
    c = copy.deepcopy(stage)
    c.seed = seed
    c.model.num_classes = CLASSES
    c.model.label_dropout = LABEL_DROPOUT
    return c


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, seeds=3, steps=2000, count=256)
    recipe = configs.experiment(__file__, 'digits_reflow',
                                'runlocal' if arg.runlocal else f'steps={arg.steps}')
    seeds = 1 if arg.runlocal else arg.seeds
    stages, models = {}, []
    for s in range(seeds):
        teacher = _conditional(recipe.teacher, s)
        couplings = _conditional(recipe.couplings, s)
        couplings.generate.teacher = f'teacher_s{s}'
        reflow = _conditional(recipe.reflow, s)
        reflow.reflow.update(couplings=f'couplings_s{s}', init=f'teacher_s{s}')
        stages.update({f'teacher_s{s}': teacher, f'couplings_s{s}': couplings, f'reflow_s{s}': reflow})
        models += [f'teacher_s{s}', f'reflow_s{s}']

    invert = table.for_method(recipe.evaluate, 'invert')
    invert.invert.models = ('analytic', *models)
    toy = configs.experiment_module(__file__, 'fireflow_toy2d')  # the same samplers and pairs as on toy data
    if arg.runlocal:  # FireFlow beside Euler and midpoint at about its NFE
        invert.invert.samplers = ('euler@3', 'fireflow@2', 'midpoint@1')
        invert.invert.differences = ('fireflow@2=euler@3', 'fireflow@2=midpoint@1')
    else:
        invert.invert.samplers = toy.samplers(SIZES)
        invert.invert.differences = toy.pairs(SIZES)
    invert.invert.count = 16 if arg.runlocal else arg.count
    stages['invert'] = invert

    for s in range(seeds):
        edit = table.for_method(recipe.evaluate, 'edit')
        edit.edit.model = f'teacher_s{s}'
        edit.edit.samplers = ('fireflow@2',) if arg.runlocal else EDIT_SAMPLERS
        edit.edit.guidance = (1.0, 2.0) if arg.runlocal else EDIT_GUIDANCE
        edit.edit.count = 4 if arg.runlocal else 16
        stages[f'edit_s{s}'] = edit

    evaluate = recipe.evaluate
    evaluate.eval.models = tuple(models)
    evaluate.eval.couplings = None
    evaluate.eval.samplers = ('fireflow@4',) if arg.runlocal else ('euler@1', 'euler@4', 'fireflow@4', 'euler@32')
    stages['evaluate'] = evaluate
    return configs.pipeline(**stages)
