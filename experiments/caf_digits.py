"""Constant acceleration flow on the embedded 8x8 digits (no download): teacher -> couplings -> 2-RF
and CAF on the same couplings with the same step budget -> evaluate.

    python -m flowjax.main --config=experiments/caf_digits.py --workdir=runs/caf_digits
    python -m flowjax.main --config=experiments/caf_digits.py --workdir=runs/caf_digits \
        --config.teacher.checkpoint=runs/digits_reflow/teacher
    python -m flowjax.main --config=experiments/caf_digits.py:runlocal --workdir=runs/quick

The teacher, its couplings (euler@32) and the 2-RF student are `digits_reflow.py`'s recipe (its
one-step distillation is left out); `--config.teacher.checkpoint=` reuses a digits_reflow teacher.
The `caf` stage (caf_toy2d.py's `caf_stage` of the 2-RF stage) trains CAF (docs/methods.md, CAF) on the same couplings
with the same train.steps, both of its networks counted (half each), its velocity network started
from the teacher like the 2-RF student, h = 1.5 and time on the grid k / 1000. The evaluate stage
scores the three with `fd_digits` at Euler 1, 2 and 4 steps, CAF's own update caf@1/2/4 (NFE N + 1)
and the recipe's 32-step Euler reference (8 steps in `runlocal`); Euler on a CAF model integrates
dx/dt = v0 + t a, one more NFE for v0. It also reports, per sampler, the coupling preservation
(PSNR of the samples from the first 1000 stored x0 against their x1) and the reconstruction (PSNR
of 1000 real digits inverted and regenerated).
Arguments: `runlocal`, `h=` (CAF's h, 1.5), `ivc=` (True), `seed=` (the students', 0), `steps=`
(student steps; the recipe's by default). `runlocal` is digits_reflow's (a one-resolution U-Net
without attention, nf 8: the U-Net XLA's CPU compiler builds fastest).
"""

from flowjax import configs


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, h=1.5, ivc=True, seed=0, steps=0)
    recipe = configs.experiment(__file__, 'digits_reflow', 'runlocal' if arg.runlocal else None)
    stages = {'teacher': recipe.teacher, 'couplings': recipe.couplings, 'reflow': recipe.reflow}
    stages['reflow'].seed = arg.seed
    if arg.steps:
        stages['reflow'].train.steps = arg.steps
    caf_stage = configs.experiment_module(__file__, 'caf_toy2d').caf_stage
    stages['caf'] = caf_stage(stages['reflow'], h=arg.h, ivc=arg.ivc)

    evaluate = recipe.evaluate
    reference = evaluate.eval.samplers[-1]  # the recipe's many-step Euler (euler@32; euler@8 in runlocal)
    evaluate.eval.models = ('teacher', 'reflow', 'caf')
    evaluate.eval.samplers = ('euler@1', 'euler@2', 'euler@4', 'caf@1', 'caf@2', 'caf@4', reference)
    pairs = min(recipe.couplings.generate.num_pairs, 1000)
    evaluate.eval.update(couplings='couplings', preservation=pairs, reconstruction=pairs)  # PSNR (images)
    return configs.pipeline(**stages, evaluate=evaluate)
