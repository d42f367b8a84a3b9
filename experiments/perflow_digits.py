"""PeRFlow on the embedded 8x8 digits (no download): its two claims at small scale, several seeds.

    python -m flowjax.main --config=experiments/perflow_digits.py --workdir=runs/perflow_digits
    python -m flowjax.main --config=experiments/perflow_digits.py:teacher=ddpm --workdir=runs/perflow_digits_ddpm
    python -m flowjax.main --config=experiments/perflow_digits.py:runlocal --workdir=runs/quick

The teacher is `digits_reflow.py`'s rectified flow (`teacher=rf`) or a DDPM eps teacher with the
same U-Net and steps (`teacher=ddpm`, linear betas, docs/methods.md, Diffusion teacher (ddpm)).
Every PeRFlow student (docs/methods.md, PeRFlow) starts from its teacher's weights and trains with
digits_reflow's 2-RF recipe (steps, learning rate, EMA), its pairs solved per batch: a real digit
noised to its window's start by the teacher's forward process, the teacher solved to the window's
end with 8 steps per window (Euler for rf, DDIM for ddpm; 32 for the one window of K = 1, so both
arms see the same teacher step size), seeds 0 .. seeds-1. The student's parameterisation is
`velocity` for an rf teacher and `diff_eps` (the SD1.5 release's) for a ddpm teacher (`param=`).

Claim 1, windows (the `evaluate_windows` stage, all digits): K = 4 (`k4_s*`) against K = 1
(`k1_s*`, one-window reflow with online pairs) at the same student steps, with the windowed sampler
at 1, 4 and 8 steps (1 step is raised to K: NFE 4 for K = 4) and the teacher as reference.

Claim 2, plug and play (the final `evaluate` stage, digits of classes CLASSES only): the teacher
fine-tuned on CLASSES (`finetune`), that fine-tuned teacher plus the change the K = 4 student
learned on the base teacher (`plug_s*` = finetune + (k4_s* - teacher), method `transfer`, no
training on the fine-tuned model), and PeRFlow trained on the fine-tuned teacher itself
(`ft_s*`, K = 4), all at 4 steps (also 1, 8 and the fine-tuned teacher's 32-step reference).

Both evaluate stages score `fd_digits` and give seed-by-seed paired differences with their t
statistics (`eval.differences`); the second stage's report is the pipeline's `report.md`, the
first's is `evaluate_windows/report.md`.
Arguments: `runlocal`, `teacher=` (rf, ddpm), `seeds=` (3), `steps=` (student steps; the recipe's
2-RF steps by default), `param=` (velocity, ddim_eps, diff_eps; by teacher by default).
"""

import copy

from flowjax import configs
from flowjax.methods import table

CLASSES = (0, 1, 2, 3, 4)  # what the base teacher is fine-tuned on (claim 2)
PER_WINDOW = 8  # teacher steps per window (PeRFlow's SD1.5 recipe)
STEPS = (1, 4, 8)


def _teacher(recipe, kind: str):
    """The base teacher: digits_reflow's rf stage, or a ddpm stage with its network and training."""
    if kind == 'rf':
        return recipe.teacher
    c = table.for_method(recipe.teacher, 'ddpm')
    c.ddpm.schedule = 'linear'
    return c


def _perflow(recipe, teacher: str, kind: str, windows: int, param: str, steps: int, seed: int):
    """A PeRFlow student of stage `teacher` (whose kind is `kind`) with `windows` windows, started
    from the teacher's weights, trained with the recipe's 2-RF settings."""
    c = table.for_method(recipe.reflow, 'perflow')
    c.perflow.teacher = teacher
    c.perflow.windows = windows
    solver = 'euler' if kind == 'rf' else 'ddim'
    c.perflow.teacher_sampler = f'{solver}@{PER_WINDOW * 4 // windows}'
    c.perflow.parameterization = param
    if steps:
        c.train.steps = steps
    c.seed = seed
    return c


def _finetune(teacher, kind: str, steps: int, runlocal: bool):
    """The base teacher trained further on digits of CLASSES only (its own method, from its weights)."""
    c = copy.deepcopy(teacher)
    c[kind].init = 'teacher'
    c.data.classes = CLASSES
    c.train.steps = 12 if runlocal else (steps or 1000)
    c.train.lr = 5e-4
    c.train.lr_final = 1.0
    return c


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, teacher='rf', seeds=3, steps=0, param='')
    if arg.teacher not in ('rf', 'ddpm'):
        raise ValueError(f'config argument teacher={arg.teacher!r}: expected rf or ddpm')
    param = arg.param or ('velocity' if arg.teacher == 'rf' else 'diff_eps')
    recipe = configs.experiment(__file__, 'digits_reflow', 'runlocal' if arg.runlocal else None)
    teacher = _teacher(recipe, arg.teacher)
    seeds = range(arg.seeds)

    stages = {'teacher': teacher}
    for seed in seeds:
        stages[f'k4_s{seed}'] = _perflow(recipe, 'teacher', arg.teacher, 4, param, arg.steps, seed)
        stages[f'k1_s{seed}'] = _perflow(recipe, 'teacher', arg.teacher, 1, param, arg.steps, seed)
    stages['finetune'] = _finetune(teacher, arg.teacher, arg.steps, arg.runlocal)
    for seed in seeds:
        stages[f'ft_s{seed}'] = _perflow(recipe, 'finetune', arg.teacher, 4, param, arg.steps, seed)
        plug = table.for_method(recipe.evaluate, 'transfer')
        plug.eval.update(samplers=(), models=())
        plug.transfer.update(base='teacher', tuned=f'k4_s{seed}', target='finetune')
        stages[f'plug_s{seed}'] = plug

    reference = recipe.evaluate.eval.samplers[-1]  # euler@32 (euler@8 in runlocal)
    samplers = tuple(f'euler@{n}' for n in STEPS) + ((reference,) if reference not in
                                                      tuple(f'euler@{n}' for n in STEPS) else ())
    if arg.teacher == 'ddpm':
        samplers += ('ddim@4', 'ddim@32' if not arg.runlocal else 'ddim@8')

    windows = copy.deepcopy(recipe.evaluate)
    windows.eval.models = ('teacher', *(f'k{k}_s{s}' for k in (4, 1) for s in seeds))
    windows.eval.couplings = None
    windows.eval.samplers = samplers
    windows.eval.groups = {f'k{k}': tuple(f'k{k}_s{s}' for s in seeds) for k in (4, 1)}
    same = tuple(f'euler@{n}=euler@{n}' for n in STEPS)
    windows.eval.differences = {'K=4 - K=1': ('k4', 'k1', *same)}
    stages['evaluate_windows'] = windows

    plug = copy.deepcopy(recipe.evaluate)
    plug.data.classes = CLASSES
    plug.eval.models = ('finetune', *(f'{p}_s{s}' for p in ('plug', 'ft') for s in seeds))
    plug.eval.couplings = None
    plug.eval.samplers = samplers
    plug.eval.groups = {p: tuple(f'{p}_s{s}' for s in seeds) for p in ('plug', 'ft')}
    same_nfe = ('euler@4=euler@4', 'euler@8=euler@8')  # the claim's 4 steps (and 8): the same NFE for all three
    plug.eval.differences = {
        'plug - finetune': ('plug', 'finetune', *same_nfe),
        'ft - plug': ('ft', 'plug', *same_nfe),
        'ft - finetune': ('ft', 'finetune', *same_nfe),
    }
    stages['evaluate'] = plug
    return configs.pipeline(**stages)
