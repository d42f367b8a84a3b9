"""SlimFlow on the embedded 8x8 digits (no download): a one-step student 4x smaller than its teacher.

    python -m flowjax.main --config=experiments/slimflow_digits.py --workdir=runs/slimflow_digits
    python -m flowjax.main --config=experiments/slimflow_digits.py:ablation --workdir=runs/slimflow_digits_ablation
    python -m flowjax.main --config=experiments/slimflow_digits.py:runlocal --workdir=runs/quick

The teacher and its couplings are those of `digits_reflow.py` (an NCSN++ U-Net, nf 16, 0.19M
parameters; 3000 pairs by 32 Euler steps), so `--config.teacher.checkpoint=runs/digits_reflow/teacher`
reuses a teacher trained there. Then `annealed`: the student (nf 8, 0.05M parameters) from random
init by annealing reflow, b linear from 1 to 0 over the first half of its steps, pairs flipped
together; `distilled`: its flow-guided one-step distillation (L2: LPIPS needs images of 16x16 or
more); `evaluate`: `fd_digits` at 1, 2, 4 and 32 Euler steps, parameter counts, `samples.png`.
`ablation` runs the two comparisons of docs/methods.md, SlimFlow over `seeds=` seeds (3) with the same
teacher, couplings and step budgets, and reports each arm's mean and spread (report.md, "Groups").
Arguments: `runlocal`, `ablation`, `seeds=`, `student_nf=` (8), `steps=` student steps (2000).
"""

from flowjax import configs
from flowjax.methods import table


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, ablation=False, seeds=3, student_nf=8, steps=2000)
    recipe = configs.experiment(__file__, 'digits_reflow', 'runlocal' if arg.runlocal else None)

    def stage(method):
        c = table.for_method(recipe.teacher, method)
        c.model.nf = 4 if arg.runlocal else arg.student_nf
        return c

    student = stage('slimflow_reflow')
    student.slimflow_reflow.couplings = 'couplings'
    if not arg.runlocal:
        student.train.steps = arg.steps
    student.slimflow_reflow.beta.steps = max(student.train.steps // 2, 1)

    distill = stage('slimflow_distill')
    distill.slimflow_distill.couplings = 'couplings'
    distill.flow.loss = 'l2'
    distill.train.steps = 12 if arg.runlocal else arg.steps // 2
    distill.train.lr = 2e-4
    distill.train.lr_final = 1.0

    evaluate = recipe.evaluate
    if arg.runlocal:
        evaluate.eval.samplers = ('euler@1', 'euler@4')
    if arg.ablation:
        evaluate.eval.samplers = ('euler@1', 'euler@2')
    return configs.slimflow_pipeline(recipe.teacher, recipe.couplings, student, distill, evaluate,
                                     seeds=arg.seeds if arg.ablation else 0)
