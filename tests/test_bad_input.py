"""Bad input, as a user meets it on the command line: one error line naming the field or file and
what was expected (the last line on stderr, after any progress log; no traceback), exit status 2,
and nothing already written changed.

Each row of CASES runs `python -m flowjax.main` once (through `cli_server`: one process imports
flowjax, each run is a fork of it). `{name}` in an argument is replaced by a path
from the `made` fixture (teachers, coupling stores and workdirs built once for the module), `{new}`
by a fresh empty directory.
"""

import hashlib
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cli_server
from conftest import ROOT, experiment_config
from flowjax import checkpoint, generate, models, train
from flowjax.data import couplings
from flowjax.methods import caf, rf, sample
from flowjax.models import kinds

TOY_RF = '--config=experiments/toy2d_rf.py:runlocal'
TOY_PIPELINE = '--config=experiments/toy2d_reflow.py:runlocal'
TOY_CAF = '--config=experiments/caf_toy2d.py:runlocal'
DIGITS_PIPELINE = '--config=experiments/digits_reflow.py:runlocal'
TOY_PERFLOW = '--config=experiments/perflow_toy2d.py:runlocal'
PERFLOW_ALONE = [TOY_PERFLOW, '--workdir={new}', '--config.stages=("perflow_k4",)',
                 '--config.perflow_k4.perflow.teacher={teacher_a}']
TOY_DDPM = '--config=experiments/ddpm_toy2d.py:runlocal'
PF_DIGITS = '--config=experiments/perflow_digits.py:runlocal,seeds=1'
TRANSFER_ALONE = [PF_DIGITS, '--workdir={new}', '--config.stages=("plug_s0",)']
# fireflow_toy2d's stage 'invert' with one sampler (and so no paired differences)
INVERT_TOY = ['--config=experiments/fireflow_toy2d.py:runlocal', '--workdir={new}']
INVERT = [*INVERT_TOY, '--config.invert.invert.samplers=("euler@4",)', '--config.invert.invert.differences=()']
EDIT = '--config=experiments/fireflow_digits.py:runlocal'
EDIT_ALONE = [EDIT, '--workdir={new}', '--config.stages=("edit_s0",)']  # the edit stage of an export given to it
SAMPLE = ['--config=experiments/sample.py:runlocal,checkpoint={teacher_a}', '--workdir={new}']
ALL_TOY = ['--config=experiments/all_methods_toy2d.py:runlocal', '--workdir={new}']  # its compare stage's fields

# (case, arguments, fragments the one error line must contain)
CASES = [
    ('config file missing', ['--config=experiments/nope.py', '--workdir={new}'], ['--config', 'nope.py']),
    ('unknown experiment argument', ['--config=experiments/toy2d_rf.py:runloca', '--workdir={new}'], ['runloca']),
    ('workdir missing', [TOY_RF], ['--workdir is required']),
    ('unknown method', [TOY_RF, '--workdir={new}', '--config.method=rff'], ['unknown method', "'rff'", 'rf']),
    ('unknown section', [TOY_RF, '--workdir={new}', '--config.trainn.steps=3'], ['trainn', 'train']),
    ('unknown field', [TOY_RF, '--workdir={new}', '--config.train.stepz=3'], ['stepz', 'steps']),
    ('wrong type', [TOY_RF, '--workdir={new}', '--config.train.steps=abc'], ['config.train.steps', 'abc']),
    ('negative steps', [TOY_RF, '--workdir={new}', '--config.train.steps=-4'], ['train.steps=-4', '>= 1']),
    ('batch not divisible by the devices', [TOY_RF, '--workdir={new}', '--config.train.batch_size=12'],
     ['train.batch_size=12', 'device count (8)']),
    ('unknown model', [TOY_RF, '--workdir={new}', '--config.model.name=unet3000'], ['model.name', 'unet3000']),
    ('unknown toy target', [TOY_RF, '--workdir={new}', '--config.data.target.name=circles'],
     ['data.target.name', 'circles']),
    ('unknown solver', [TOY_RF, '--workdir={new}', '--config.eval.samplers=("eulr@4",)'], ['eulr']),
    ('unknown time grid', [TOY_RF, '--workdir={new}', '--config.eval.samplers=("euler@4:edm=-1",)'],
     ['eval.samplers', "edm=-1", 'rho must be a number > 0']),
    ('label dropout not a probability', [EDIT, '--workdir={new}', '--config.teacher_s0.model.label_dropout=1.5'],
     ['model.label_dropout=1.5', 'probability in [0, 1)']),
    ('guidance scale negative', [TOY_RF, '--workdir={new}', '--config.eval.guidance=-1.0'],
     ['eval.guidance=-1.0', 'expected a guidance scale']),
    ('guidance of an unconditional model', [TOY_RF, '--workdir={new}', '--config.eval.guidance=2.0'],
     ['eval.guidance=2', 'not class-conditional', 'model.label_dropout > 0']),
    ('coupling guidance of an unconditional teacher', [TOY_PIPELINE, '--workdir={new}',
                                                       '--config.teacher.checkpoint={teacher_a}',
                                                       '--config.couplings.generate.guidance=3.0'],
     ['generate.guidance=3', 'the teacher', 'not class-conditional']),
    ('coupling guidance not a number', [TOY_PIPELINE, '--workdir={new}', '--config.couplings.generate.guidance=inf'],
     ['generate.guidance=inf', 'finite number >= 0']),
    ('time shift not a number', [TOY_RF, '--workdir={new}', '--config.eval.samplers=("fireflow@4:shift=abc",)'],
     ['eval.samplers', "'shift=abc'", 'mu must be a finite number']),
    ('RF-Solver without steps', [TOY_RF, '--workdir={new}', '--config.eval.samplers=("rf_solver@0",)'],
     ['eval.samplers', "'rf_solver@0'", 'steps must be an integer >= 1']),
    ('unknown time distribution', [TOY_RF, '--workdir={new}', '--config.flow.time=ushape'],
     ['flow.time', 'ushape', 'u_shaped']),
    ('U-shape parameter', [TOY_RF, '--workdir={new}', '--config.flow.u_shape_a=-1.0'], ['flow.u_shape_a=-1.0', '> 0']),
    ('logit-normal spread', [TOY_RF, '--workdir={new}', '--config.flow.logit_std=0.0'], ['flow.logit_std=0.0', '> 0']),
    ('time grid points', [TOY_RF, '--workdir={new}', '--config.flow.grid_points=0'], ['flow.grid_points=0', '>= 1']),
    ('LPIPS loss on toy data', [TOY_RF, '--workdir={new}', '--config.flow.loss=lpips_huber'],
     ['flow.loss', 'lpips_huber', "data.kind='image'"]),
    ('unknown flow loss', [TOY_RF, '--workdir={new}', '--config.flow.loss=huber'],
     ['flow.loss', 'huber', 'pseudo_huber']),
    ('negative weight decay', [TOY_RF, '--workdir={new}', '--config.train.weight_decay=-1.0'],
     ['train.weight_decay=-1.0', '>= 0']),
    ('pseudo-Huber c', [TOY_RF, '--workdir={new}', '--config.flow.huber_c=-1.0'], ['flow.huber_c=-1.0', '> 0']),
    ('LPIPS time clamp', [TOY_RF, '--workdir={new}', '--config.flow.lpips_t_min=2.0'],
     ['flow.lpips_t_min=2.0', '(0, 1]']),
    ('flow t_eps', [TOY_RF, '--workdir={new}', '--config.flow.t_eps=0.7'], ['flow.t_eps=0.7', '(0, 0.5)']),
    ('per-sample normalisation not a bool', [TOY_RF, '--workdir={new}', '--config.flow.normalize=maybe'],
     ['flow.normalize', 'maybe']),
    ('EMA warm-up not a bool', [TOY_RF, '--workdir={new}', '--config.train.ema_warmup=sometimes'],
     ['train.ema_warmup', 'sometimes']),
    ('paired groups of unequal size', ['--config=experiments/reflow_options.py:runlocal', '--workdir={new}',
                                       '--config.evaluate.eval.groups.reflow=("reflow_s0",)'],
     ['evaluate.eval.differences.', 'have 3 and 1 models']),
    ("another method's field in a stage", [TOY_PIPELINE, '--workdir={new}', '--config.teacher.distill.k=2'],
     ['distill']),
    ('unknown solver in a pipeline stage', [TOY_PIPELINE, '--workdir={new}', '--config.couplings.generate.sampler=rk99'],
     ['couplings.generate.sampler', 'rk99']),
    ('NFE < 1', [TOY_PIPELINE, '--workdir={new}', '--config.couplings.generate.sampler=euler@0'],
     ['couplings.generate.sampler', 'euler@0']),
    ('no pairs', [TOY_PIPELINE, '--workdir={new}', '--config.couplings.generate.num_pairs=0'],
     ['couplings.generate.num_pairs=0', '>= 1']),
    ('mix fraction out of range', [TOY_PIPELINE, '--workdir={new}', '--config.reflow.reflow.mix_fraction=1.5'],
     ['reflow.reflow.mix_fraction=1.5', 'in [0, 1]']),
    ('mixed coupling store missing', [TOY_PIPELINE, '--workdir={new}', '--config.reflow.reflow.mix_fraction=0.5',
                                      '--config.reflow.reflow.mix_couplings={new}/nothing'],
     ['reflow.reflow.mix_couplings=', 'neither an earlier stage']),
    ('missing teacher export', [TOY_PIPELINE, '--workdir={new}', '--config.teacher.checkpoint={new}/nothing'],
     ['teacher.checkpoint=', 'no exported model here']),
    ('teacher of another data shape', ['--config=experiments/digits_reflow.py:runlocal', '--workdir={new}',
                                       '--config.teacher.checkpoint={teacher_a}'],
     ['generate.teacher', 'shape [2]', "data.kind='image'"]),
    ('student shape differs from its init', [TOY_PIPELINE, '--workdir={pipeline_copy}',
                                             '--config.teacher.checkpoint={teacher_a}',
                                             '--config.reflow.model.features=(16,)'],
     ['reflow.init', 'differs from model']),
    ('coupling store of another teacher', [TOY_PIPELINE, '--workdir={pipeline_copy}',
                                           '--config.teacher.checkpoint={teacher_b}'],
     ['couplings', 'coupling store was made with teacher=', 'teacher_b', 'another workdir']),
    ('truncated coupling shard', [TOY_PIPELINE, '--workdir={truncated}', '--config.teacher.checkpoint={teacher_a}'],
     ['shard', 'truncated or corrupted']),
    ('compressed coupling shard', [TOY_PIPELINE, '--workdir={compressed}', '--config.teacher.checkpoint={teacher_a}'],
     ['shard-000000.npz', 'member x0 is compressed', 'regenerate the store']),
    ('workdir holds another experiment', [TOY_RF, '--workdir={trained}', '--config.seed=1'],
     ['checkpoints', 'different experiment', 'seed']),
    ('workdir not writable', [TOY_RF, '--workdir={a_file}/run'], ['--workdir=', 'cannot write there']),
    # compile_cache (flowjax/compile_cache.py); a directory that cannot be made warns: tests/test_compile_cache.py
    ('compile cache not a string', ['--config={int_compile_cache}', '--workdir={new}'],
     ['compile_cache=8', "expected a directory, 'auto'", "'none' (off)"]),
    ('compile cache of a pipeline stage', [TOY_PIPELINE, '--workdir={new}', '--config.teacher.compile_cache={new}/xla'],
     ['teacher.compile_cache=', 'the whole job', 'top level of the pipeline']),
    ('missing dataset', ['--config=experiments/rf_cifar.py:runlocal', '--workdir={new}',
                         '--config.data.image.data_dir={new}'], ["'cifar10'", 'not prepared', 'data.image.data_dir']),
    ('missing FID weights', ['--config=experiments/rf_cifar.py:runlocal', '--workdir={new}', '--config.eval.metric=fid'],
     ['eval.inception_weights', 'Inception weights']),
    ('rf.init export missing', [TOY_RF, '--workdir={new}', '--config.rf.init={new}/nothing'],
     ['nothing', 'no exported model here']),
    ('rf.init of another network', [TOY_RF, '--workdir={new}', '--config.rf.init={trained}',
                                    '--config.model.features=(16,)'], ['rf.init', 'differs from model']),
    ('rf.init not a velocity field', [TOY_RF, '--workdir={new}', '--config.rf.init={caf_a}'],
     ['rf.init', "model of kind 'caf'", "velocity field (kind 'velocity')"]),
    ('data.classes on toy data', [TOY_RF, '--workdir={new}', '--config.data.classes=(0,1)'],
     ['data.classes=(0, 1)', 'labelled images', "data.kind='toy2d'"]),
    ('data.classes not class ids', [DIGITS_PIPELINE, '--workdir={new}', '--config.teacher.data.classes=(1.5,)'],
     ['teacher.data.classes=(1.5,)', 'tuple of distinct class ids']),
    ('data.classes a string', [DIGITS_PIPELINE, '--workdir={new}', "--config.teacher.data.classes='3'"],
     ['data.classes', 'tuple of distinct class ids']),
    ('data.classes absent from the images', [DIGITS_PIPELINE, '--workdir={new}', '--config.teacher.data.classes=(0,12)'],
     ['data.classes=(0, 12)', 'has label 12', 'labels 0..9']),
    ('reconstruction beyond the held-out sample', [TOY_RF, '--workdir={new}', '--config.eval.reconstruction=300'],
     ['eval.reconstruction=300', 'more than the 256 points', 'eval.num_samples']),
    ('preservation beyond the stored pairs', [TOY_PIPELINE, '--workdir={pipeline_copy}',
                                              '--config.teacher.checkpoint={teacher_a}',
                                              '--config.evaluate.eval.preservation=513'],
     ['evaluate.eval.preservation=513', 'more pairs than the 512', 'eval.couplings=']),
    ('LPIPS scores of toy data', [TOY_RF, '--workdir={new}', '--config.eval.lpips=True'],
     ['eval.lpips=True', "data.kind='toy2d'"]),
    # CAF (docs/methods.md, CAF): the caf section of caf_toy2d's stage 'caf', and caf@N given for a velocity
    # model. More bad values of caf.h, caf.ivc, caf.velocity_steps (0) and train.steps: tests/test_caf.py.
    ('CAF h = 0', [TOY_CAF, '--workdir={new}', '--config.caf.caf.h=0'], ['caf.caf.h=0.0', 'must be a number > 0']),
    ('CAF ivc not a bool', [TOY_CAF, '--workdir={new}', '--config.caf.caf.ivc=maybe'],
     ['caf.caf.ivc', 'maybe', 'boolean']),
    ('CAF velocity steps all of train.steps', [TOY_CAF, '--workdir={new}', '--config.caf.caf.velocity_steps=40'],
     ['caf.caf.velocity_steps=40', 'in [1, train.steps)', 'train.steps=40']),
    ('CAF init not a velocity export', [TOY_CAF, '--workdir={new}', '--config.stages=("caf",)',
                                        '--config.caf.caf.couplings=', '--config.caf.caf.init={caf_a}'],
     ['caf.init', "model of kind 'caf'", "a student starts from a velocity field (kind 'velocity')"]),
    ('caf@N to evaluate a velocity model', [TOY_PIPELINE, '--workdir={new}', '--config.stages=("evaluate",)',
                                            '--config.evaluate.eval.models=("{teacher_a}",)',
                                            '--config.evaluate.eval.couplings=',
                                            '--config.evaluate.eval.samplers=("caf@1",)'],
     ['none of eval.samplers (caf@1) applies', "kind 'velocity'"]),
    ('caf@N coupling sampler of a velocity teacher', [TOY_CAF, '--workdir={new}',
                                                      '--config.teacher.checkpoint={teacher_a}',
                                                      '--config.couplings.generate.sampler=caf@2'],
     ["generate.sampler='caf@2'", 'does not apply', "kind 'velocity'"]),
    ('caf@N online sampler of a velocity teacher', [TOY_PIPELINE, '--workdir={new}', '--config.stages=("reflow",)',
                                                    '--config.reflow.reflow.couplings=', '--config.reflow.reflow.init=',
                                                    '--config.reflow.reflow.online_teacher={teacher_a}',
                                                    '--config.reflow.reflow.online_sampler=caf@4'],
     ["reflow.online_sampler='caf@4'", 'does not apply', "kind 'velocity'"]),
    # PeRFlow (docs/methods.md, PeRFlow): the perflow section of perflow_toy2d's stage 'perflow_k4'; the teacher
    # checks run against teacher_a (a velocity field) and caf_a. More refusals: tests/test_perflow.py.
    ('PeRFlow windows = 0', [TOY_PERFLOW, '--workdir={new}', '--config.perflow_k4.perflow.windows=0'],
     ['perflow_k4.perflow.windows=0', 'integer >= 1']),
    ('PeRFlow fewer grid points than windows', [TOY_PERFLOW, '--workdir={new}',
                                                '--config.perflow_k4.perflow.grid_points=2'],
     ['perflow_k4.perflow.grid_points=2', 'integer >= perflow.windows (4)']),
    ('PeRFlow adaptive teacher sampler', [TOY_PERFLOW, '--workdir={new}',
                                          '--config.perflow_k4.perflow.teacher_sampler=rk45'],
     ["perflow_k4.perflow.teacher_sampler='rk45'", 'fixed-step sampler']),
    ('PeRFlow unknown teacher sampler', [TOY_PERFLOW, '--workdir={new}',
                                         '--config.perflow_k4.perflow.teacher_sampler=eulr@2'],
     ['perflow_k4.perflow.teacher_sampler', "unknown solver 'eulr'"]),
    ('PeRFlow unknown parameterization', [TOY_PERFLOW, '--workdir={new}',
                                          '--config.perflow_k4.perflow.parameterization=x0'],
     ["perflow_k4.perflow.parameterization='x0'", 'velocity, ddim_eps, diff_eps']),
    ('PeRFlow flow time', [TOY_PERFLOW, '--workdir={new}', '--config.perflow_k4.flow.time=grid'],
     ["perflow_k4.flow.time='grid'", 'perflow draws its own times']),
    ('PeRFlow teacher missing', [TOY_PERFLOW, '--workdir={new}', '--config.perflow_k4.perflow.teacher='],
     ['perflow_k4.perflow.teacher', 'is required']),
    ('PeRFlow eps parameterization of a rectified-flow teacher',
     [*PERFLOW_ALONE, '--config.perflow_k4.perflow.parameterization=ddim_eps'],
     ["perflow.parameterization='ddim_eps'", 'needs a VP (ddpm) teacher', 'linear process']),
    ('PeRFlow CAF teacher', [TOY_PERFLOW, '--workdir={new}', '--config.stages=("perflow_k4",)',
                             '--config.perflow_k4.perflow.teacher={caf_a}'],
     ['perflow.teacher', "model of kind 'caf'", 'not a caf or piecewise model']),
    ('PeRFlow start of another kind', [*PERFLOW_ALONE, '--config.perflow_k4.perflow.init={caf_a}'],
     ['perflow.init', "model of kind 'caf'", 'the student starts from one network']),
    ('PeRFlow teacher sampler of another kind', [*PERFLOW_ALONE, '--config.perflow_k4.perflow.teacher_sampler=caf@2'],
     ["perflow.teacher_sampler='caf@2'", 'does not apply to the teacher', "kind 'velocity'"]),
    # transfer (docs/methods.md, Weight transfer (plug-and-play)): perflow_digits' stage plug_s0, alone with
    # exports given for its three models. More refusals: tests/test_transfer.py.
    ('transfer scale not finite', [PF_DIGITS, '--workdir={new}', '--config.plug_s0.transfer.scale=inf'],
     ['plug_s0.transfer.scale=inf', 'must be a finite number']),
    ('transfer base missing', [PF_DIGITS, '--workdir={new}', '--config.plug_s0.transfer.base='],
     ['plug_s0.transfer.base', 'is required']),
    ('transfer target missing', [PF_DIGITS, '--workdir={new}', '--config.plug_s0.transfer.target='],
     ['plug_s0.transfer.target', 'is required']),
    ('transfer export missing', [*TRANSFER_ALONE, '--config.plug_s0.transfer.base={new}/nothing',
                                 '--config.plug_s0.transfer.tuned={teacher_a}',
                                 '--config.plug_s0.transfer.target={teacher_a}'],
     ['transfer.base', 'nothing']),
    ('transfer parameters differ', [*TRANSFER_ALONE, '--config.plug_s0.transfer.base={teacher_a}',
                                    '--config.plug_s0.transfer.tuned={caf_a}',
                                    '--config.plug_s0.transfer.target={teacher_a}'],
     ['transfer.tuned', 'parameter']),
    # ddpm (docs/methods.md, Diffusion teacher (ddpm)): the ddpm section of ddpm_toy2d, its flow.time, and ddim@N
    # for a velocity model. More bad values (of ddpm.init too): tests/test_ddpm.py.
    ('ddpm schedule', [TOY_DDPM, '--workdir={new}', '--config.ddpm.schedule=quadratic'],
     ["ddpm.schedule='quadratic'", 'expected one of linear, cosine']),
    ('ddpm timesteps < 2', [TOY_DDPM, '--workdir={new}', '--config.ddpm.timesteps=1'],
     ['ddpm.timesteps=1', 'must be an integer >= 2']),
    ('ddpm init missing', [TOY_DDPM, '--workdir={new}', '--config.ddpm.init={new}/nothing'],
     ['ddpm.init: ', 'nothing: no exported model here']),
    ('ddpm init not a ddpm export', [TOY_DDPM, '--workdir={new}', '--config.ddpm.init={teacher_a}'],
     ['ddpm.init', "model of kind 'velocity'", "a ddpm run starts from a ddpm export (kind 'ddpm')"]),
    ('flow time of a ddpm run', [TOY_DDPM, '--workdir={new}', '--config.flow.time=u_shaped'],
     ["flow.time='u_shaped'", 'ddpm draws its own times, k uniform in {1..T}']),
    ('ddim@N to train a velocity model', [TOY_RF, '--workdir={new}', '--config.eval.samplers=("ddim@4",)'],
     ["eval.samplers=('ddim@4',)", "none applies to a model of kind 'velocity'"]),
    # invert (docs/methods.md, Inversion (method invert)): the invert section of fireflow_toy2d's stage 'invert'.
    # More bad values (of every field's type) and a sampler that applies to no model: tests/test_invert.py.
    ('invert models empty', [*INVERT, '--config.invert.invert.models=()'],
     ['invert.invert.models=()', 'non-empty tuple', "'analytic'"]),
    ('invert model listed twice', [*INVERT, '--config.invert.invert.models=("analytic","analytic")'],
     ['invert.invert.models', "label 'analytic' is listed twice"]),
    ('invert model neither stage nor export', [*INVERT, '--config.invert.invert.models=("nothing",)'],
     ['invert.invert.models=', 'nothing', 'neither an earlier stage']),
    ('invert samplers empty', [*INVERT_TOY, '--config.invert.invert.samplers=()'],
     ['invert.invert.samplers=()', 'non-empty tuple of sampler specs']),
    ('invert unknown sampler', [*INVERT_TOY, '--config.invert.invert.samplers=("eulr@4",)'],
     ['invert.invert.samplers', "unknown solver 'eulr'"]),
    ('invert count 0', [*INVERT, '--config.invert.invert.count=0'], ['invert.invert.count=0', 'int >= 1']),
    ('invert count beyond the held-out sample', [*INVERT, '--config.invert.invert.count=300'],
     ['invert.invert.count=300', 'more than the 256 points', 'eval.num_samples']),
    ('invert guidance negative', [*INVERT, '--config.invert.invert.guidance=-1'],
     ['invert.invert.guidance=-1.0', 'guidance scale, a finite number >= 0']),
    ('invert grid negative', [*INVERT, '--config.invert.invert.grid=-1'], ['invert.invert.grid=-1', 'int >= 0']),
    ('invert difference of an unknown sampler', [*INVERT, '--config.invert.invert.differences=("euler@4=heun@2",)'],
     ['invert.invert.differences', "'euler@4=heun@2'", 'two different keys of invert.samplers (euler@4)']),
    ('invert LPIPS of toy data', [*INVERT, '--config.invert.eval.lpips=True'],
     ['invert.eval.lpips=True', "data.kind='toy2d'"]),
    # edit (docs/methods.md, Editing (method edit)): fireflow_digits' stage 'edit_s0', with its teacher stage or alone with
    # an export given (digits_cond: class-conditional, no label dropout). More refusals: tests/test_edit.py.
    ('edit model missing', [*EDIT_ALONE, '--config.edit_s0.edit.model='], ['edit_s0.edit.model', 'is required']),
    ('edit model export missing', [*EDIT_ALONE, '--config.edit_s0.edit.model={new}/nothing'],
     ['edit_s0.edit.model=', 'neither an earlier stage nor an existing directory']),
    ('edit model not class-conditional', [*EDIT_ALONE, '--config.edit_s0.edit.model={teacher_a}'],
     ['edit.model=', 'is not class-conditional', 'model.num_classes > 0']),
    ('edit samplers empty', [EDIT, '--workdir={new}', '--config.edit_s0.edit.samplers=()'],
     ['edit_s0.edit.samplers=()', 'non-empty tuple of distinct sampler specs']),
    ('edit unknown sampler', [EDIT, '--workdir={new}', '--config.edit_s0.edit.samplers=("eulr@2",)'],
     ['edit_s0.edit.samplers', "unknown solver 'eulr'"]),
    ('edit sampler of another kind', [*EDIT_ALONE, '--config.edit_s0.edit.model={digits_cond}',
                                      '--config.edit_s0.edit.guidance=(1.0,)', '--config.edit_s0.edit.samplers=("caf@2",)'],
     ["edit.samplers: 'caf@2' does not apply", "kind 'velocity'"]),
    ('edit guidance negative', [EDIT, '--workdir={new}', '--config.edit_s0.edit.guidance=(1.0,-2.0)'],
     ['edit_s0.edit.guidance=-2.0', 'finite number >= 0']),
    ('edit guidance empty', [EDIT, '--workdir={new}', '--config.edit_s0.edit.guidance=()'],
     ['edit_s0.edit.guidance=()', 'non-empty tuple of guidance scales']),
    ('edit guidance without a null label', [*EDIT_ALONE, '--config.edit_s0.edit.model={digits_cond}'],
     ['edit.guidance=2', 'has no null label', 'model.label_dropout > 0']),
    ('edit count 0', [EDIT, '--workdir={new}', '--config.edit_s0.edit.count=0'], ['edit_s0.edit.count=0', 'integer >= 1']),
    ('edit count beyond the images', [EDIT, '--workdir={new}', '--config.edit_s0.edit.count=2000'],
     ['edit_s0.edit.count=2000', 'more than the 1797 images']),
    ('edit grid 0', [EDIT, '--workdir={new}', '--config.edit_s0.edit.grid=0'], ['edit_s0.edit.grid=0', 'integer >= 1']),
    ('edit targets unknown', [EDIT, '--workdir={new}', '--config.edit_s0.edit.targets=every'],
     ["edit_s0.edit.targets='every'", "'all', 'next' or a non-empty tuple of distinct class ids"]),
    ('edit targets repeated', [EDIT, '--workdir={new}', '--config.edit_s0.edit.targets=(1,1)'],
     ['edit_s0.edit.targets=(1, 1)', 'distinct class ids']),
    ('edit target beyond the classes', [*EDIT_ALONE, '--config.edit_s0.edit.model={digits_cond}',
                                        '--config.edit_s0.edit.guidance=(1.0,)', '--config.edit_s0.edit.targets=(3,12)'],
     ['edit.targets=(3, 12)', 'class 12 is not a class', 'num_classes=10']),
    ('edit of toy data', [EDIT, '--workdir={new}', '--config.edit_s0.data.kind=toy2d'],
     ["edit_s0.data.kind='toy2d'", "data.kind='image'"]),
    # sample (docs/methods.md, Sample job): experiments/sample.py:runlocal of teacher_a (an unconditional toy model);
    # `samples` holds a finished job of it (seed 0). More refusals (another kind's sampler, a class beyond the
    # model's, a foreign samples.npz): tests/test_sample.py.
    ('sample checkpoint missing', ['--config=experiments/sample.py:runlocal', '--workdir={new}'],
     ['sample.checkpoint', 'is required']),
    ('sample checkpoint not an export', [*SAMPLE, '--config.sample.checkpoint={new}/nothing'],
     ['sample.checkpoint: ', 'nothing: no exported model here']),
    ('sample count 0', [*SAMPLE, '--config.sample.count=0'], ['sample.count=0', 'integer >= 1']),
    ('sample unknown sampler', [*SAMPLE, '--config.sample.sampler=eulr@4'], ['sample.sampler', "unknown solver 'eulr'"]),
    ('sample sampler of another kind', [*SAMPLE, '--config.sample.sampler=caf@2'],
     ["sample.sampler='caf@2'", 'does not apply', "kind 'velocity'"]),
    ('sample seed negative', [*SAMPLE, '--config.sample.seed=-1'], ['sample.seed=-1', 'integer >= 0']),
    ('sample batch not divisible by the devices', [*SAMPLE, '--config.sample.batch_size=12'],
     ['sample.batch_size=12', 'device count (8)']),
    ('sample labels unknown', [*SAMPLE, '--config.sample.labels=some'],
     ["sample.labels='some'", "'uniform', a class id >= 0 or a non-empty tuple"]),
    ('sample labels negative', [*SAMPLE, '--config.sample.labels=(1,-1)'], ['sample.labels=(1, -1)', 'class ids >= 0']),
    ('sample labels of an unconditional model', [*SAMPLE, '--config.sample.labels=3'],
     ['sample.labels=3', 'is not class-conditional', 'model.num_classes > 0']),
    ('sample guidance negative', [*SAMPLE, '--config.sample.guidance=-1.0'],
     ['sample.guidance=-1.0', 'finite number >= 0']),
    ('sample guidance of an unconditional model', [*SAMPLE, '--config.sample.guidance=2.0'],
     ['sample.guidance=2', 'not class-conditional', 'model.label_dropout > 0']),
    ('sample grid negative', [*SAMPLE, '--config.sample.grid=-1'], ['sample.grid=-1', 'integer >= 0']),
    ('sample workdir of another job', [*SAMPLE, '--workdir={samples}', '--config.sample.seed=1'],
     ['parts: holds samples made with seed=0 but this run asks for seed=1', 'use another workdir']),
    ('compare report not a stage', [*ALL_TOY, '--config.compare.compare.report=nowhere'],
     ["compare.compare.report='nowhere'", 'neither an earlier stage nor an existing directory']),
    ('compare stages not a stage', [*ALL_TOY, '--config.compare.compare.stages=("nowhere",)'],
     ["compare.compare.stages='nowhere'", 'neither an earlier stage nor an existing directory']),
    ('compare method of a stage not in compare.stages', [*ALL_TOY, '--config.compare.compare.methods.reflow=("reflow_s9",)'],
     ["compare.compare.methods.reflow: stage 'reflow_s9'", 'is not in compare.stages']),
    ('compare method without seeds', [*ALL_TOY, '--config.compare.compare.methods.reflow=()'],
     ['compare.compare.methods.reflow=()', 'non-empty tuple']),
    ('compare baseline unknown', [*ALL_TOY, '--config.compare.compare.baseline=rf'],
     ["compare.compare.baseline='rf'", 'not a method of compare.methods']),
    ('compare part unknown', [*ALL_TOY, '--config.compare.compare.parts.caf_u=("cafx",)'],
     ["compare.compare.parts.caf_u: 'cafx' is not a method of compare.methods"]),
    ('compare part with other seeds', [*ALL_TOY, '--config.compare.compare.methods.caf=("caf_s0",)'],
     ["compare.compare.parts.caf_u: 'caf_u' and 'caf' have 2 and 1 seeds"]),
    ('compare nfes 0', [*ALL_TOY, '--config.compare.compare.nfes=(0,)'],
     ['compare.compare.nfes=(0,)', 'distinct integers >= 1']),
    ('compare default samplers empty', [*ALL_TOY, '--config.compare.compare.default_samplers=()'],
     ['compare.compare.default_samplers=()', 'non-empty tuple']),
    ('compare samplers empty', [*ALL_TOY, '--config.compare.compare.samplers.caf=()'],
     ['compare.compare.samplers.caf=()', 'non-empty tuple']),
    ('compare order unknown', [*ALL_TOY, '--config.compare.compare.order=("rf_teacher","x")'],
     ["compare.compare.order: 'x' is not a method of compare.methods"]),
]


# An experiment file that builds its config from a dict, so that no field's type is kept.
INT_COMPILE_CACHE = '''import ml_collections

from flowjax.methods import table


def get_config():
    return ml_collections.ConfigDict(dict(table.config('rf').to_dict(), compile_cache=8))
'''


def _export_random_teacher(path, config, seed: int) -> None:
    """An export of config.model with random weights: what the checks read is its model and shape."""
    params = models.build(config.model).init(jax.random.key(seed), jnp.zeros((1, 2)), jnp.zeros((1,)))
    checkpoint.export(path, params, train.export_meta(config, kinds.from_config(config), (2,), config.train.steps))


@pytest.fixture(scope='module')
def made(tmp_path_factory):
    """Teachers a and b, the runlocal pipeline's coupling store made from a (whole, with a truncated
    shard and with a compressed one), a workdir with checkpoints of toy2d_rf:runlocal, a regular file,
    and an experiment file whose config has an int compile_cache."""
    root = tmp_path_factory.mktemp('made')
    pipeline = experiment_config('toy2d_reflow', 'runlocal')
    for name, seed in (('teacher_a', 0), ('teacher_b', 1)):
        _export_random_teacher(root / name, pipeline.teacher, seed)
    store = pipeline.couplings
    store.generate.teacher = str(root / 'teacher_a')  # what the pipeline passes for a stand-in teacher
    generate.generate_couplings(store, root / 'pipeline' / 'couplings')
    shutil.copytree(root / 'pipeline', root / 'truncated')
    shard = couplings.shard_path(root / 'truncated' / 'couplings', 0)
    shard.write_bytes(shard.read_bytes()[:100])
    shutil.copytree(root / 'pipeline', root / 'compressed')  # a shard np.load reads but not in place
    shard = couplings.shard_path(root / 'compressed' / 'couplings', 0)
    with np.load(shard) as npz:
        arrays = {name: npz[name] for name in npz.files}
    np.savez_compressed(shard, **arrays)

    toy = experiment_config('toy2d_rf', 'runlocal')
    toy.train.steps = toy.train.checkpoint_every
    toy.eval.samplers = ()
    rf.run(toy, str(root / 'trained'))
    (root / 'a_file').write_text('not a directory')
    (root / 'int_compile_cache.py').write_text(INT_COMPILE_CACHE)
    # CAF: a CAF export of the caf_toy2d:runlocal stage's model, its weights zeros (only its kind is read).
    caf_stage = experiment_config('caf_toy2d', 'runlocal').caf
    kind = caf.kind_of(caf_stage)
    shapes = jax.eval_shape(lambda key: kind.init(key, (2,)), jax.random.key(0))
    checkpoint.export(root / 'caf_a', jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                      train.export_meta(caf_stage, kind, (2,), caf_stage.train.steps))
    # edit: a class-conditional NCSN++ digits export without label dropout, its weights zeros (no null label)
    edit_stage = experiment_config('fireflow_digits', 'runlocal').teacher_s0
    edit_stage.model.label_dropout = 0.0
    kind = kinds.from_config(edit_stage)
    shapes = jax.eval_shape(lambda key: kind.init(key, (8, 8, 1)), jax.random.key(0))
    checkpoint.export(root / 'digits_cond', jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                      train.export_meta(edit_stage, kind, (8, 8, 1), edit_stage.train.steps))
    # sample: a finished job of teacher_a, as experiments/sample.py:runlocal makes it (fewer samples)
    samples = experiment_config('sample', f"runlocal,checkpoint={root / 'teacher_a'},count=16")
    sample.run(samples, str(root / 'samples'))
    return root


@pytest.fixture(scope='module')
def cli():
    """`python -m flowjax.main` on 8 CPU devices, from one server process that imported flowjax once."""
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
    with cli_server.Server(env) as server:
        yield server


def _snapshot(root) -> dict[str, str]:
    """Every file under `root` -> a hash of its bytes."""
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), 'rb').read()).hexdigest()
            for d, _, files in os.walk(root) for f in files}


@pytest.mark.parametrize('case, args, fragments', CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_harmless(made, cli, tmp_path, case, args, fragments):
    paths = {'new': tmp_path / 'new', 'pipeline_copy': tmp_path / 'pipeline', 'a_file': made / 'a_file',
             **{name: made / name for name in ('teacher_a', 'teacher_b', 'truncated', 'compressed', 'trained',
                                                   'caf_a', 'digits_cond', 'samples')},
             'int_compile_cache': made / 'int_compile_cache.py'}
    if any('{pipeline_copy}' in a for a in args):
        shutil.copytree(made / 'pipeline', paths['pipeline_copy'])
    before = _snapshot(made), _snapshot(tmp_path)
    status, _, stderr = cli.run([a.format(**paths) for a in args], cwd=ROOT)
    errors = [line for line in stderr.splitlines() if line.startswith('flowjax: error: ')]
    assert status == 2 and len(errors) == 1, f'{case}: status {status}\n{stderr[-3000:]}'
    assert 'Traceback' not in stderr and stderr.strip().splitlines()[-1] == errors[0], stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], f'{case}: {fragment!r} not in {errors[0]!r}'
    for old, new in zip(before, (_snapshot(made), _snapshot(tmp_path))):
        changed = [name for name, digest in old.items() if new.get(name) != digest]
        assert not changed, f'{case}: changed or removed {changed}'



# Safetensors weights (docs/methods.md, Safetensors layout): `python -m flowjax.interop.safetensors_io`, each row run
# in-process through its `main(argv)` (the first also as a real command line). `{name}` is a path of `weights`.
SAFETENSORS_CASES = [
    ('safetensors: not a safetensors file', ['import', '{meta_json}', '{new}'], ['meta.json', 'not a safetensors file']),
    ('safetensors: no flowjax meta', ['import', '{bare}', '{new}'], ['bare.safetensors', 'without flowjax meta']),
    ('safetensors: a shape the meta does not fit', ['import', '{shape}', '{new}'],
     ["tensor 'params/params.out.kernel' has shape [3, 2]", "(kind 'velocity') expects [32, 2]"]),
    ('safetensors: a tensor the model lacks', ['import', '{extra}', '{new}'],
     ["tensor 'params/params.extra' is not a parameter", "kind 'velocity'"]),
    ('safetensors: a missing file', ['import', '{new}/none.safetensors', '{new}'], ['none.safetensors', 'no such file']),
    ('safetensors: an import over an export', ['import', '{good}', '{export}'], ['export: exists', 'another directory']),
    ('safetensors: no export to write', ['export', '{new}', '{new}/out.safetensors'], ['no exported model here']),
    ('safetensors: an output file that exists', ['export', '{export}', '{good}'], ['good.safetensors: exists']),
    ('safetensors: an unknown command', ['convert', '{good}'], ["invalid choice: 'convert'", 'usage: python -m']),
    ('safetensors: a missing argument', ['export', '{export}'], ['required: file', 'usage: python -m']),
]


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """A random toy export, its safetensors file, one without flowjax meta, one with a wrong shape, one with a
    tensor too many."""
    import json

    from safetensors.numpy import save_file

    from conftest import random_export
    from flowjax.interop import safetensors_io

    root = tmp_path_factory.mktemp('weights')
    export = random_export(experiment_config('toy2d_rf', 'runlocal'), root / 'trained')
    good = safetensors_io.export_to_file(export, root / 'good.safetensors')
    params, meta = safetensors_io.load(good)
    flat, header = safetensors_io.flatten(params), {safetensors_io.META_KEY: json.dumps(meta)}
    save_file(flat, str(root / 'bare.safetensors'))
    save_file(dict(flat, **{'params/params.out.kernel': np.zeros((3, 2), np.float32)}), str(root / 'shape.safetensors'),
              metadata=header)
    save_file(dict(flat, **{'params/params.extra': np.zeros(2, np.float32)}), str(root / 'extra.safetensors'),
              metadata=header)
    return {'export': root / 'trained' / 'export', 'meta_json': root / 'trained' / 'export' / 'meta.json',
            **{name: root / f'{name}.safetensors' for name in ('good', 'bare', 'shape', 'extra')}}


def _command_line_case(module, argv, roots, capsys, case, fragments, *, real: bool) -> None:
    """`module.main(argv)` exits 2 with one line `flowjax: error: ...` holding every fragment, and changes no file
    under `roots`; with `real`, the same line comes from `python -m <module>`."""
    before = [_snapshot(root) for root in roots]
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith('flowjax: error: '), f'{case}: {stderr}'
    for fragment in fragments:
        assert fragment in lines[0], f'{case}: {fragment!r} not in {lines[0]!r}'
    if real:  # the same line from a real command line
        run = subprocess.run([sys.executable, '-m', module.__name__, *argv], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 2 and run.stderr.strip() == lines[0], run.stderr[-2000:]
    for old, new in zip(before, (_snapshot(root) for root in roots)):
        assert old == new, f'{case}: changed {sorted(set(old.items()) ^ set(new.items()))}'


@pytest.mark.parametrize('case, args, fragments', SAFETENSORS_CASES, ids=[c[0] for c in SAFETENSORS_CASES])
def test_safetensors_bad_input_is_one_line_and_harmless(weights, tmp_path, capsys, case, args, fragments):
    from flowjax.interop import safetensors_io

    argv = [a.format(new=tmp_path / 'new', **weights) for a in args]
    _command_line_case(safetensors_io, argv, (weights['good'].parent, tmp_path), capsys, case, fragments,
                       real=case == SAFETENSORS_CASES[0][0])


# PyTorch NCSN++ teachers (docs/methods.md, Importing PyTorch teachers): `python -m flowjax.interop.torch_ncsnpp`,
# each row run in-process through its `main(argv)` (the first also as a real command line). `{name}` is a path
# of `torch_checkpoints`: the 8x8 reference fixture and variants of it written without torch.
_SIZE = ['--config', 'data.image_size=8']
TORCH_NCSNPP_CASES = [
    ('torch: not a checkpoint file', ['--checkpoint', '{text}', '--out', '{new}', *_SIZE],
     ['notes.txt is not a readable PyTorch checkpoint']),
    ('torch: a pickle naming code', ['--checkpoint', '{code}', '--out', '{new}', *_SIZE],
     ['unsupported object posix.system']),
    ('torch: a state dict, not a checkpoint', ['--checkpoint', '{bare}', '--out', '{new}', *_SIZE],
     ['is not a score_sde_pytorch checkpoint', 'model, ema, optimizer and step']),
    ('torch: a missing key', ['--checkpoint', '{missing}', '--out', '{new}', '--weights', 'model', *_SIZE],
     ['missing key all_modules.3.Conv_1.weight']),
    ('torch: a wrong shape', ['--checkpoint', '{shape}', '--out', '{new}', '--weights', 'model', *_SIZE],
     ['all_modules.3.Dense_0.weight has shape [16, 63], expected [16, 64]']),
    ('torch: an EMA tensor of a wrong shape', ['--checkpoint', '{ema_shape}', '--out', '{new}', *_SIZE],
     ["ema.shadow_params[5] (parameter 'all_modules.2.bias') has shape [3], expected [16]"]),
    ('torch: EMA tensors too few', ['--checkpoint', '{ema_short}', '--out', '{new}', *_SIZE],
     ['ema.shadow_params holds 153 tensors', "'model' has 154 parameters"]),
    ('torch: no EMA', ['--checkpoint', '{no_ema}', '--out', '{new}', *_SIZE], ['no EMA weights', '--weights model']),
    ('torch: Fourier time features', ['--checkpoint', '{fourier}', '--out', '{new}', *_SIZE],
     ["model.embedding_type='fourier'", 'log(999 t)']),
    ('torch: FIR resampling', ['--checkpoint', '{good}', '--out', '{new}', *_SIZE, '--config', 'model.fir=True'],
     ['model.fir=True: not supported', 'FIR']),
    ('torch: no image size', ['--checkpoint', '{good}', '--out', '{new}'], ['give data.image_size=N']),
    ('torch: an image size the net cannot halve', ['--checkpoint', '{good}', '--out', '{new}', '--config',
                                                   'data.image_size=7'], ['data.image_size=7', 'multiple of 2']),
    ('torch: a field the shapes contradict', ['--checkpoint', '{good}', '--out', '{new}', *_SIZE, '--config',
                                              'model.nf=32'], ["model.nf=32: the checkpoint's network has 16"]),
    ('torch: attention elsewhere', ['--checkpoint', '{good}', '--out', '{new}', *_SIZE, '--config',
                                    'model.attn_resolutions=(8,)'], ['model.attn_resolutions=(8,)', 'attention at (4,)']),
    ('torch: an unknown field', ['--checkpoint', '{good}', '--out', '{new}', *_SIZE, '--config', 'model.nff=3'],
     ["--config 'model.nff=3': expected key=value", 'data.image_size']),
    ('torch: a field of the wrong type', ['--checkpoint', '{good}', '--out', '{new}', *_SIZE, '--config',
                                          'model.dropout=abc'], ['model.dropout=abc: expected float']),
    ('torch: a missing file', ['--checkpoint', '{new}/none.pth', '--out', '{new}', *_SIZE], ['none.pth', 'no such file']),
    ('torch: an export there', ['--checkpoint', '{good}', '--out', '{export}', *_SIZE],
     ['export exists', 'another directory']),
    ('torch: unknown weights', ['--checkpoint', '{good}', '--out', '{new}', '--weights', 'swa', *_SIZE],
     ["invalid choice: 'swa'", 'usage: python -m flowjax.interop.torch_ncsnpp']),
]


@pytest.fixture(scope='module')
def torch_checkpoints(tmp_path_factory):
    """The 8x8 reference checkpoint, variants of it (written without torch) and an export to write over."""
    import collections

    import torch_files
    from flowjax.interop import torch_ncsnpp, torch_pickle

    root = tmp_path_factory.mktemp('torch')
    good = ROOT / 'tests' / 'fixtures' / 'ncsnpp_rf_8x8.pth'
    ckpt = torch_pickle.load(str(good), 'fixture')
    model = ckpt['model']

    def variant(name, **changes):
        torch_files.save({**ckpt, **changes}, root / f'{name}.pth')

    variant('missing', model=collections.OrderedDict((k, v) for k, v in model.items()
                                                     if k != 'module.all_modules.3.Conv_1.weight'))
    variant('shape', model=collections.OrderedDict(
        (k, np.zeros((16, 63), np.float32) if k == 'module.all_modules.3.Dense_0.weight' else v) for k, v in model.items()))
    shadow = list(ckpt['ema']['shadow_params'])
    variant('ema_shape', ema={**ckpt['ema'], 'shadow_params': shadow[:5] + [np.zeros(3, np.float32)] + shadow[6:]})
    variant('ema_short', ema={**ckpt['ema'], 'shadow_params': shadow[:-1]})
    variant('no_ema', ema={})
    shifted = collections.OrderedDict([('module.all_modules.0.W', np.ones(16, np.float32))])
    for key, value in model.items():
        head, _, rest = key.partition('all_modules.')
        index, _, name = rest.partition('.')
        shifted[f'{head}all_modules.{int(index) + 1}.{name}' if rest else key] = value
    variant('fourier', model=shifted)
    torch_files.save(dict(model), root / 'bare.pth')
    torch_files.save({'model': torch_files.Global('posix', 'system')}, root / 'code.pth')
    (root / 'notes.txt').write_text('not a checkpoint\n')
    torch_ncsnpp.write(str(good), str(root / 'converted'), 'ema', {'data.image_size': 8})
    names = ('missing', 'shape', 'ema_shape', 'ema_short', 'no_ema', 'fourier', 'bare', 'code')
    return {'good': good, 'text': root / 'notes.txt', 'export': root / 'converted',
            **{name: root / f'{name}.pth' for name in names}}


@pytest.mark.parametrize('case, args, fragments', TORCH_NCSNPP_CASES, ids=[c[0] for c in TORCH_NCSNPP_CASES])
def test_torch_ncsnpp_bad_input_is_one_line_and_harmless(torch_checkpoints, tmp_path, capsys, case, args, fragments):
    from flowjax.interop import torch_ncsnpp

    argv = [a.format(new=tmp_path / 'new', **torch_checkpoints) for a in args]
    _command_line_case(torch_ncsnpp, argv, (torch_checkpoints['export'].parent, tmp_path), capsys, case, fragments,
                       real=case == TORCH_NCSNPP_CASES[0][0])
    assert not (tmp_path / 'new').exists(), f'{case}: wrote {tmp_path / "new"}'
