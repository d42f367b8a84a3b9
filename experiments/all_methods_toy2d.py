"""Every method on one teacher, in one table (toy 2D, two moons): one 1-RF teacher, one coupling store,
every student at the same training budget, 3 seeds, then one report.

    python -m flowjax.main --config=experiments/all_methods_toy2d.py --workdir=runs/all_methods_toy2d
    python -m flowjax.main --config=experiments/all_methods_toy2d.py:runlocal --workdir=runs/quick

The teacher, its couplings (10,000 pairs by RK45) and the training settings are `toy2d_reflow.py`'s.
Per seed s (stage `<method>_s<s>`; METHODS lists them), every student trains for the recipe's 2-RF
steps S with its learning rate; the two one-step students distil for the recipe's distillation steps
on top of their first stage (their `steps` column counts both):

    reflow         2-RF from the teacher (uniform t, L2): the baseline of the paired differences
    distill        one-step distillation (L2) of that seed's 2-RF student
    slimflow       SlimFlow: a small student (MLP 2 x 32, 1/24 of the teacher's parameters) from random init
                   by annealing reflow (b linear 1 -> 0 over S/2 steps), then flow-guided distillation (L2)
    rfpp           U-shaped t (a = 4), pseudo-Huber, EMA from step 1, no clipping (rfpp_digits.py's)
    simple_reflow  Simple ReFlow's pinned-down options: L / stopgrad(L), t density ~ 10^{t_noise}, and half
                   of every batch from forward pairs (stage `forward_pairs`: real data inverted by the teacher)
    caf            CAF, h = 1.5, both networks in S steps (caf_toy2d.py's `caf_stage`)
    perflow        PeRFlow with K = 4 windows on the RF teacher, 8 teacher Euler steps per window
    slimflow_u_norm  composition: SlimFlow's small student with U-shaped t and per-sample normalisation
    caf_u          composition: CAF with U-shaped t instead of its grid k / 1000

The `evaluate` stage scores the teacher and every student with Euler at 1, 2, 4 steps and CAF's own
update caf@1 / caf@3 (2 and 4 NFE; runlocal: 1 and 4 NFE only), with coupling preservation (the
first 1000 stored pairs) and reconstruction (1000 held-out points); the `compare` stage (method
compare, docs/methods.md, Method table) writes the table: quality at NFE 1, 2, 4 (w2), params,
steps, training time, straightness, fidelity, mean ± sd over seeds, the paired differences against
2-RF and of each composition against each of its parts, and quality_nfe.png. Arguments: `runlocal`
(tiny networks and steps, 2 seeds), `seeds=` (3; 2 in runlocal), `target=` (moons), `steps=` (S; the
recipe's 3000 by default, distillation S / 2).
"""

import copy

from flowjax import configs
from flowjax.methods import table

METHODS = ('reflow', 'distill', 'slimflow', 'rfpp', 'simple_reflow', 'caf', 'perflow', 'slimflow_u_norm', 'caf_u')
PARTS = {'slimflow_u_norm': ('slimflow', 'rfpp', 'simple_reflow'), 'caf_u': ('caf', 'rfpp')}
NFES = (1, 2, 4)  # the table's quality columns (runlocal: 1 and 4)
WINDOWS = 4  # PeRFlow's K
TEACHER_STEPS = 32  # PeRFlow's teacher Euler steps over [0, 1], split over the windows
# a two-stage student's first stage: its chain in the table is '<first>_s<s>+<method>_s<s>'
FIRST_STAGE = {'distill': 'reflow', 'slimflow': 'slimflow_annealed', 'slimflow_u_norm': 'slimflow_u_norm_annealed'}
FORWARD_FRACTION = 0.5  # Simple ReFlow: the fraction of every batch from the forward pairs (not given by the paper)


def _seeded(c, seed: int):
    c = copy.deepcopy(c)
    c.seed = seed
    return c


def _u_shaped(c):
    c.flow.update(time='u_shaped', u_shape_a=4.0)
    return c


def _slimflow(recipe, small_model: dict, *, normalize_u: bool = False):
    """SlimFlow's two stages (annealing reflow, flow-guided distillation) of a small student with the
    recipe's 2-RF and distillation budgets; with `normalize_u`, the annealing stage also trains with
    U-shaped t and per-sample normalisation (the composition)."""
    annealed = table.for_method(recipe.teacher, 'slimflow_reflow')
    annealed.model.update(small_model)
    annealed.train.steps = recipe.reflow.train.steps
    annealed.slimflow_reflow.couplings = 'couplings'
    annealed.slimflow_reflow.beta.steps = max(annealed.train.steps // 2, 1)
    if normalize_u:
        _u_shaped(annealed).flow.normalize = True
    distilled = table.for_method(recipe.teacher, 'slimflow_distill')
    distilled.model.update(small_model)
    distilled.slimflow_distill.couplings = 'couplings'
    distilled.flow.loss = 'l2'
    distilled.train.update(steps=recipe.distill.train.steps, lr=recipe.distill.train.lr, lr_final=1.0)
    return annealed, distilled


def every_method(recipe, *, title: str, small_model: dict, seeds: int, nfes=NFES, steps: int = 0):
    """The pipeline of every method on `recipe`'s teacher and couplings (a toy2d_reflow / digits_reflow
    config): the students of METHODS per seed, `evaluate` and `compare`; `steps` > 0 replaces the
    recipe's 2-RF steps S (and its distillation steps by S / 2). CAF's, rfpp's and Simple ReFlow's stages
    are built by the single-method experiments' own helpers (caf_toy2d, rfpp_digits, simple_reflow_digits)."""
    caf_stage = configs.experiment_module(__file__, 'caf_toy2d').caf_stage
    rfpp_options = configs.experiment_module(__file__, 'rfpp_digits').rfpp_options
    simple_reflow_options = configs.experiment_module(__file__, 'simple_reflow_digits').simple_reflow_options
    if steps:
        recipe.reflow.train.steps = steps
        recipe.distill.train.steps = max(steps // 2, 1)
    reflow = recipe.reflow
    stages = {'teacher': recipe.teacher, 'couplings': recipe.couplings}
    forward = table.for_method(recipe.couplings, 'generate')
    forward.generate.direction = 'forward'  # real data -> noise by the teacher (Simple ReFlow's forward pairs)
    stages['forward_pairs'] = forward
    chains = {m: [] for m in METHODS}
    for s in range(seeds):
        students = {'reflow': _seeded(reflow, s)}
        distill = _seeded(recipe.distill, s)
        distill.distill.init = f'reflow_s{s}'
        students['distill'] = distill
        for name, composed in (('slimflow', False), ('slimflow_u_norm', True)):
            annealed, distilled = (_seeded(c, s) for c in _slimflow(recipe, small_model, normalize_u=composed))
            distilled.slimflow_distill.init = f'{name}_annealed_s{s}'
            students[f'{name}_annealed'] = annealed
            students[name] = distilled
        students['rfpp'] = rfpp_options(_seeded(reflow, s))
        # the teacher was trained without dropout, so the student's "less dropout" is the same (none)
        simple = simple_reflow_options(_seeded(reflow, s), dropout=reflow.model.dropout)
        simple.reflow.update(mix_couplings='forward_pairs', mix_fraction=FORWARD_FRACTION)
        students['simple_reflow'] = simple
        students['caf'] = caf_stage(_seeded(reflow, s))
        students['caf_u'] = _u_shaped(caf_stage(_seeded(reflow, s)))
        perflow = table.for_method(_seeded(reflow, s), 'perflow')
        perflow.perflow.update(teacher='teacher', windows=WINDOWS, teacher_sampler=f'euler@{TEACHER_STEPS // WINDOWS}')
        students['perflow'] = perflow
        for name, c in students.items():
            stages[f'{name}_s{s}'] = c
        for m in METHODS:
            first = FIRST_STAGE.get(m)
            chains[m].append('+'.join([f'{first}_s{s}'] * bool(first) + [f'{m}_s{s}']))

    evaluate = recipe.evaluate
    evaluate.eval.models = ('teacher', *(chain.split('+')[-1] for m in METHODS for chain in chains[m]))
    caf_samplers = tuple(f'caf@{n - 1}' for n in nfes if n > 1)  # CAF's update costs N + 1 NFE (its v0)
    evaluate.eval.samplers = (*(f'euler@{n}' for n in nfes), *caf_samplers)
    pairs = min(recipe.couplings.generate.num_pairs, 1000)
    evaluate.eval.update(couplings='couplings', preservation=pairs, reconstruction=min(evaluate.eval.num_samples, 1000))
    stages['evaluate'] = evaluate

    compare = table.config('compare')  # reads only its own section
    compare.compare.report = 'evaluate'
    compare.compare.stages = tuple(name for name in stages if name not in ('couplings', 'forward_pairs', 'evaluate'))
    compare.compare.methods = {'rf_teacher': ('teacher',), **{m: tuple(chains[m]) for m in METHODS}}
    compare.compare.parts = PARTS
    compare.compare.order = ('rf_teacher', *METHODS)
    compare.compare.nfes = nfes
    compare.compare.default_samplers = tuple(f'euler@{n}' for n in nfes)
    # PeRFlow raises N to K: euler@1, @2 and @4 all cost 4 NFE and are the same solve; its column names euler@4
    compare.compare.samplers = {'caf': caf_samplers, 'caf_u': caf_samplers, 'perflow': (f'euler@{WINDOWS}',)}
    compare.compare.title = title
    stages['compare'] = compare
    return configs.pipeline(**stages)


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, seeds=0, target='moons', steps=0)
    recipe = configs.experiment(__file__, 'toy2d_reflow', f'runlocal={arg.runlocal},target={arg.target}')
    small = {'features': (16, 16) if arg.runlocal else (32, 32), 'time_dim': 16}
    return every_method(recipe, title=f'Every method on one teacher ({arg.target})', small_model=small,
                        seeds=arg.seeds or (2 if arg.runlocal else 3), nfes=(1, 4) if arg.runlocal else NFES,
                        steps=arg.steps)
