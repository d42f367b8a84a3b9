"""Ablation of constant acceleration flow: CAF against 2-RF on one teacher's couplings with one step
budget, CAF's h and its initial velocity conditioning, several seeds per arm.

    python -m flowjax.main --config=experiments/caf_ablation.py:data=gmm --workdir=runs/caf_ablation_gmm
    python -m flowjax.main --config=experiments/caf_ablation.py:data=moons --workdir=runs/caf_ablation_moons
    python -m flowjax.main --config=experiments/caf_ablation.py:data=digits --workdir=runs/caf_ablation_digits
    python -m flowjax.main --config=experiments/caf_ablation.py:runlocal --workdir=runs/quick

The teacher, its couplings and the 2-RF recipe are `caf_toy2d.py`'s (data=gmm, moons) or
`digits_reflow.py`'s (data=digits). Every arm trains on those couplings with the recipe's 2-RF
train.steps (CAF: both networks together, half each), learning rate and EMA, starting from the
teacher, seeds 0 .. seeds-1:

    reflow      2-RF (the baseline CAF is compared with)
    caf         CAF, h = 1.5, IVC on, time grid k / 1000 (docs/methods.md, CAF)
    caf_h1      CAF with h = 1        (toy data)
    caf_h2      CAF with h = 2        (toy data)
    caf_noivc   CAF without IVC (the acceleration network's velocity slot is zeros)

The evaluate stage scores every model with Euler at 1..5 steps and CAF's caf@1/2/4 (NFE N + 1):
quality (w2 on toy data, fd_digits on digits), coupling preservation on the first stored pairs and
reconstruction of held-out data (`eval.preservation`, `eval.reconstruction`); it summarises each
arm over its seeds (`eval.groups`) and gives seed-by-seed paired differences (`eval.differences`):
CAF's caf@N against 2-RF's euler@N (the same steps) and against euler@(N+1) (the same NFE), and each
CAF variant against `caf` at caf@N.
Arguments: `runlocal`, `data=` (gmm, moons, digits), `seeds=` (3), `steps=` (student steps; the
recipe's by default), `arms=` (a subset joined by '+'; reflow and caf are always run).
"""

import copy

from flowjax import configs

CAF_ARMS = {'caf': {}, 'caf_h1': {'h': 1.0}, 'caf_h2': {'h': 2.0}, 'caf_noivc': {'ivc': False}}
TOY_ONLY = ('caf_h1', 'caf_h2')
STEPS = (1, 2, 4)
SAMPLERS = ('euler@1', 'euler@2', 'euler@3', 'euler@4', 'euler@5', *(f'caf@{n}' for n in STEPS))


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, data='gmm', seeds=3, steps=0, arms='')
    if arg.data not in ('gmm', 'moons', 'digits'):
        raise ValueError(f'config argument data={arg.data!r}: expected gmm, moons or digits')
    local = 'runlocal' if arg.runlocal else None
    caf_stage = configs.experiment_module(__file__, 'caf_toy2d').caf_stage
    if arg.data == 'digits':
        recipe = configs.experiment(__file__, 'digits_reflow', local)
    else:
        recipe = configs.experiment(__file__, 'caf_toy2d', f'data={arg.data}' + (',runlocal' if local else ''))
    chosen = set(arg.arms.split('+')) if arg.arms else set(CAF_ARMS) | {'reflow'}
    unknown = sorted(chosen - set(CAF_ARMS) - {'reflow'})
    if unknown:
        raise ValueError(f"config argument arms: unknown arm {unknown[0]!r} (expected reflow, {', '.join(CAF_ARMS)})")
    toy_only = TOY_ONLY if arg.data == 'digits' else ()
    arms = ['reflow', *(a for a in CAF_ARMS if (a in chosen or a == 'caf') and a not in toy_only)]

    stages = {'teacher': recipe.teacher, 'couplings': recipe.couplings}
    for arm in arms:
        for seed in range(arg.seeds):
            c = copy.deepcopy(recipe.reflow)
            if arg.steps:
                c.train.steps = arg.steps
            if arm != 'reflow':
                c = caf_stage(c, h=CAF_ARMS[arm].get('h', 1.5), ivc=CAF_ARMS[arm].get('ivc', True))
            c.seed = seed
            stages[f'{arm}_s{seed}'] = c

    evaluate = recipe.evaluate
    evaluate.eval.models = tuple(name for name in stages if name != 'couplings')
    evaluate.eval.samplers = SAMPLERS
    evaluate.eval.couplings = 'couplings'
    pairs = min(recipe.couplings.generate.num_pairs, 1000)
    evaluate.eval.preservation = pairs
    evaluate.eval.reconstruction = min(pairs, evaluate.eval.num_samples)
    evaluate.eval.groups = {arm: tuple(f'{arm}_s{s}' for s in range(arg.seeds)) for arm in arms}
    same_steps = tuple(f'caf@{n}=euler@{n}' for n in STEPS)
    same_nfe = tuple(f'caf@{n}=euler@{n + 1}' for n in STEPS)
    own = tuple(f'caf@{n}=caf@{n}' for n in STEPS)
    evaluate.eval.differences = {
        'caf - reflow (same steps)': ('caf', 'reflow', *same_steps),
        'caf - reflow (same NFE)': ('caf', 'reflow', *same_nfe),
        **{f'{arm} - caf': (arm, 'caf', *own) for arm in arms if arm not in ('reflow', 'caf')},
    }
    return configs.pipeline(**stages, evaluate=evaluate)
