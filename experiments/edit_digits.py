"""Class-conditional editing by inversion on the embedded 8x8 digits (no download).

    python -m flowjax.main --config=experiments/edit_digits.py --workdir=runs/edit_digits
    python -m flowjax.main --config=experiments/edit_digits.py:runlocal --workdir=runs/quick

Stage `teacher`: digits_reflow.py's rectified-flow teacher, class-conditional (10 digit classes) and
trained with label dropout 0.1, so it has a null label for classifier-free guidance. Stage `edit`
(docs/methods.md, Editing (method edit)): 16 held-out digits inverted with their own label and
regenerated as every digit class, with Euler and midpoint at 8 and 32 steps (runlocal: Euler at 2
and 4), guidance 1, 2 and 4; `edit/edit.md` holds the scores, `edit/edit.png` the grids.
Arguments: `runlocal`, `steps=` teacher steps.
"""

from flowjax import configs
from flowjax.methods import table


def _stage(method: str, runlocal: bool):
    c = table.config(method)
    c.seed = 0
    c.data.kind = 'image'
    c.data.image = {'name': 'digits'}
    c.data.flip = True
    c.model = {'name': 'ncsnpp', 'nf': 8 if runlocal else 16, 'ch_mult': (1, 2), 'num_res_blocks': 1,
               'attn_resolutions': (4,), 'dropout': 0.0, 'num_classes': 10, 'label_dropout': 0.1}
    c.eval.samplers = ()
    c.eval.batch_size = 64 if runlocal else 256
    return c


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, steps=2000)
    teacher = _stage('rf', arg.runlocal)
    teacher.train.steps = 12 if arg.runlocal else arg.steps
    teacher.train.batch_size = 16 if arg.runlocal else 128
    teacher.train.lr = 2e-3
    teacher.train.warmup_steps = 200
    teacher.train.lr_final = 0.05
    teacher.train.log_every = 5 if arg.runlocal else 100
    teacher.train.checkpoint_every = 10 if arg.runlocal else 500

    edit = _stage('edit', arg.runlocal)
    edit.edit.model = 'teacher'
    edit.edit.samplers = ('euler@2', 'euler@4') if arg.runlocal else ('euler@8', 'euler@32', 'midpoint@8',
                                                                         'midpoint@32')
    edit.edit.guidance = (1.0, 2.0) if arg.runlocal else (1.0, 2.0, 4.0)
    edit.edit.count = 16
    edit.edit.targets = 'all'
    return configs.pipeline(teacher=teacher, edit=edit)
