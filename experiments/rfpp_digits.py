"""rfpp on the embedded 8x8 digits: one reflow round trained well (docs/methods.md, rfpp).

    python -m flowjax.main --config=experiments/rfpp_digits.py --workdir=runs/rfpp_digits
    python -m flowjax.main --config=experiments/rfpp_digits.py:runlocal --workdir=runs/quick

The teacher and couplings of `digits_reflow.py`, then two students initialised from the teacher
on the same couplings and step budget: `reflow` (2-RF: uniform t, L2, EMA with its warm-up rule)
and `rfpp` (U-shaped t with a = 4, pseudo-Huber with c = 0.00054 d, EMA from step 1 without the
warm-up rule, no gradient clipping). The evaluate stage scores teacher and both students with
`fd_digits` at 1, 2 and 4 Euler steps. Arguments: `runlocal`, `lpips` (LPIPS-Huber instead of
pseudo-Huber: images resized to 32x32 for VGG16, the weights file from `vgg=`), `vgg=`, and
`digits_reflow.py`'s `nf=`, `pairs=`, `steps=`.
"""

from flowjax import configs
from flowjax.methods import table


def rfpp_options(c, *, lpips: bool = False, vgg: str | None = None):
    """rfpp's training choices on a reflow stage `c` (in place): U-shaped t, pseudo-Huber (or
    LPIPS-Huber with VGG16 average pooling), EMA from step 1, no clipping."""
    c.flow.update(time='u_shaped', u_shape_a=4.0, loss='lpips_huber' if lpips else 'pseudo_huber')
    if lpips:
        c.lpips.update(pool='avg', vgg_weights=vgg)
    c.train.ema_warmup = False
    c.train.grad_clip = 0.0
    return c


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, lpips=False, vgg='', nf=16, pairs=3000, steps=2000)
    recipe = configs.experiment(__file__, 'digits_reflow',
                                ','.join(['runlocal'] * arg.runlocal + [f'nf={arg.nf}', f'pairs={arg.pairs}',
                                                                        f'steps={arg.steps}']))
    reflow = recipe.reflow
    rfpp = rfpp_options(table.for_method(reflow, 'reflow'), lpips=arg.lpips, vgg=arg.vgg or None)
    rfpp.reflow.update(couplings='couplings', init='teacher')
    if arg.lpips:
        rfpp.lpips.resize = 32  # VGG16 pools four times: 8x8 digits are too small for it
    evaluate = recipe.evaluate
    evaluate.eval.models = ('teacher', 'reflow', 'rfpp')
    evaluate.eval.samplers = ('euler@1', 'euler@2', 'euler@4')
    return configs.pipeline(teacher=recipe.teacher, couplings=recipe.couplings, reflow=reflow, rfpp=rfpp,
                            evaluate=evaluate)
