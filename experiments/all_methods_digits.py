"""Every method on one teacher, in one table (the embedded 8x8 digits, no download): one 1-RF teacher,
one coupling store, every student at the same training budget, 3 seeds, then one report.

    python -m flowjax.main --config=experiments/all_methods_digits.py --workdir=runs/all_methods_digits
    python -m flowjax.main --config=experiments/all_methods_digits.py --workdir=runs/all_methods_digits \
        --config.teacher.checkpoint=runs/digits_reflow/teacher
    python -m flowjax.main --config=experiments/all_methods_digits.py:runlocal --workdir=runs/quick

The teacher (NCSN++ nf 16, 2000 steps), its couplings (3000 pairs by 32 Euler steps) and the training
settings are `digits_reflow.py`'s; the students and the report are `all_methods_toy2d.py`'s
(`every_method`, its METHODS); every student trains S = 500 steps (`steps=`; digits_reflow's 2-RF trains
1000, which with PeRFlow's teacher solves per batch would take about two hours on 2 CPU cores; at 500
the whole run took 1 h 13 min there) and the two one-step students distil S / 2 more, with SlimFlow's
small student an NCSN++ of nf 8 (about 1/4 of the teacher's parameters). Quality is `fd_digits` (Frechet
distance in the features of the shipped digits classifier) of 1000 samples; preservation and
reconstruction are PSNR on 1000 stored pairs and 1000 real digits. rfpp keeps its EMA from step 1 (decay
0.999), which at S = 500 leaves 61% of the teacher's weights in the evaluated EMA (README, Every method
on one teacher). rfpp uses pseudo-Huber: its LPIPS-Huber needs VGG16 weights (not shipped) and images of
16x16 or more (`rfpp_digits.py:lpips,vgg=` resizes to 32x32). Arguments: `runlocal` (digits_reflow's
one-resolution U-Net, nf 8 (small student nf 4), a few steps, one seed: all_methods_toy2d's runlocal
tests the statistics over seeds), `seeds=` (3; 1 in runlocal), `student_nf=` (8), `steps=` (S, 500).
"""

from flowjax import configs

STEPS = 500  # S, every student's budget (digits_reflow's 2-RF trains 1000)


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, seeds=0, student_nf=8, steps=STEPS)
    recipe = configs.experiment(__file__, 'digits_reflow', 'runlocal' if arg.runlocal else None)
    toy = configs.experiment_module(__file__, 'all_methods_toy2d')
    return toy.every_method(recipe, title='Every method on one teacher (digits)',
                            small_model={'nf': 4 if arg.runlocal else arg.student_nf},
                            seeds=arg.seeds or (1 if arg.runlocal else 3), nfes=(1, 4) if arg.runlocal else toy.NFES,
                            steps=0 if arg.runlocal else arg.steps)
