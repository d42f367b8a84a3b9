"""Constant acceleration flow on toy 2D data: 1-RF teacher -> couplings -> 2-RF and CAF on the same
couplings with the same step budget -> evaluate.

    python -m flowjax.main --config=experiments/caf_toy2d.py --workdir=runs/caf_gmm
    python -m flowjax.main --config=experiments/caf_toy2d.py:data=moons --workdir=runs/caf_moons
    python -m flowjax.main --config=experiments/caf_toy2d.py:runlocal --workdir=runs/quick

`data=gmm` (default) maps a Gaussian mixture to a Gaussian mixture: 4 modes on a circle of radius
2 to the 8-mode ring of radius 4, where straight couplings cross (the methods sheet does not give
the paper's exact mixtures; these are ours). `data=moons` maps normal noise to two moons.
The teacher, its couplings (rk45) and the 2-RF student are `toy2d_reflow.py`'s recipe; the `caf`
stage trains CAF (docs/methods.md, CAF) on the same couplings with the same train.steps, both of
its networks counted (half each), its velocity network started from the teacher like 2-RF's
student, time on the grid k / 1000 as in CAF's code. The evaluate stage scores all three with
Euler at 1, 2 and 4 steps, CAF's own update caf@1/2/4 (NFE N + 1) and rk45, and reports the
coupling preservation on the first stored pairs and the reconstruction of held-out data.
Arguments: `runlocal`, `data=` (gmm, moons), `h=` (CAF's h, 1.5), `ivc=` (True), `seed=` (0),
`steps=` (student steps; the recipe's by default).
"""

from flowjax import configs
from flowjax.methods import table

DATA = {
    'gmm': {'source': {'name': 'gmm', 'modes': 4, 'radius': 2.0, 'std': 0.3},
            'target': {'name': '8gaussians', 'radius': 4.0, 'std': 0.4}},
    'moons': {'source': {'name': 'normal'}, 'target': {'name': 'moons'}},
}
SAMPLERS = ('euler@1', 'euler@2', 'euler@4', 'caf@1', 'caf@2', 'caf@4', 'rk45')


def caf_stage(reflow, *, h: float = 1.5, ivc: bool = True):
    """The CAF stage matching a reflow stage: the same data, model, couplings, init (widened), seed and
    step budget (train.steps, both networks counted), CAF's time grid k / 1000. The other CAF
    experiments compare CAF with 2-RF through it."""
    c = table.for_method(reflow, 'caf')
    c.caf.update(couplings=reflow.reflow.couplings, init=reflow.reflow.init, h=h, ivc=ivc)
    c.flow.time = 'grid'
    return c


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, data='gmm', h=1.5, ivc=True, seed=0, steps=0)
    if arg.data not in DATA:
        raise ValueError(f"config argument data={arg.data!r}: expected {', '.join(DATA)}")
    recipe = configs.experiment(__file__, 'toy2d_reflow', 'runlocal' if arg.runlocal else None)
    stages = {'teacher': recipe.teacher, 'couplings': recipe.couplings, 'reflow': recipe.reflow}
    for stage in stages.values():
        stage.data.source = DATA[arg.data]['source']
        stage.data.target = DATA[arg.data]['target']
    stages['reflow'].seed = arg.seed
    if arg.steps:
        stages['reflow'].train.steps = arg.steps
    stages['caf'] = caf_stage(stages['reflow'], h=arg.h, ivc=arg.ivc)

    evaluate = recipe.evaluate
    evaluate.data.source = DATA[arg.data]['source']
    evaluate.data.target = DATA[arg.data]['target']
    evaluate.eval.models = ('teacher', 'reflow', 'caf')
    evaluate.eval.samplers = SAMPLERS
    evaluate.eval.couplings = 'couplings'
    evaluate.eval.preservation = min(recipe.couplings.generate.num_pairs, 1000)  # the first stored pairs
    evaluate.eval.reconstruction = min(evaluate.eval.num_samples, 1000)  # held-out points
    return configs.pipeline(**stages, evaluate=evaluate)
