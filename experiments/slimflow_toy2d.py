"""SlimFlow on a toy 2D target (two moons by default): a small one-step MLP student.

    python -m flowjax.main --config=experiments/slimflow_toy2d.py --workdir=runs/slimflow_toy2d
    python -m flowjax.main --config=experiments/slimflow_toy2d.py:ablation --workdir=runs/slimflow_toy2d_ablation

The teacher and its couplings are those of `toy2d_reflow.py` (a 1-RF MLP, 3 x 128; 10,000 pairs
by RK45). Then `annealed`: a student about 5x smaller (MLP 2 x 32, 16-d time embedding) trained
from random init by annealing reflow (b linear from 1 to 0 over half its steps); `distilled`: its
flow-guided one-step distillation (L2); `evaluate`: `w2` at 1, 2, 4 Euler steps and RK45 and each
model's parameter count. `ablation` runs the two comparisons of docs/methods.md, SlimFlow over
`seeds=` seeds (5) with the same teacher, couplings and step budgets (`configs.slimflow_pipeline`)
and reports each arm's mean and spread. Arguments: `runlocal`, `ablation`, `seeds=`, `target=`, `pairs=`.
"""

from flowjax import configs
from flowjax.methods import table


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, ablation=False, seeds=5, target='moons', pairs=10_000)
    recipe = configs.experiment(__file__, 'toy2d_reflow', f'runlocal={arg.runlocal},target={arg.target},'
                                f'pairs={arg.pairs}')

    def student(method, steps, lr):
        c = table.for_method(recipe.teacher, method)
        c.model.update(features=(16, 16) if arg.runlocal else (32, 32), time_dim=16)
        c.train.update(steps=40 if arg.runlocal else steps, lr=lr)
        return c

    annealed = student('slimflow_reflow', 4000, 2e-3)
    annealed.slimflow_reflow.couplings = 'couplings'
    annealed.slimflow_reflow.beta.steps = annealed.train.steps // 2

    distill = student('slimflow_distill', 2000, 5e-4)
    distill.slimflow_distill.couplings = 'couplings'
    distill.flow.loss = 'l2'

    evaluate = recipe.evaluate
    if arg.ablation:
        evaluate.eval.samplers = ('euler@1', 'euler@2')
    return configs.slimflow_pipeline(recipe.teacher, recipe.couplings, annealed, distill, evaluate,
                                     seeds=arg.seeds if arg.ablation else 0)
