"""The fields every method shares, and the `:arg` parser of experiment files.

`base()` holds what all methods share (data, model, flow, train, eval, the LPIPS network); a
method's own section comes with the method (`flowjax/methods/table.py: config(name)` gives
base() plus that section). An experiment file's `get_config(arg)` starts from it, sets what it
needs, and returns the config; main locks it, so a typo in an override is an error.
"""

import copy

import ml_collections
from ml_collections import config_dict

from flowjax import compile_cache
from flowjax.flows import objective


def base() -> ml_collections.ConfigDict:
    """The sections every method shares; experiment files override them."""
    c = ml_collections.ConfigDict()
    c.method = 'rf'
    c.name = config_dict.placeholder(str)  # the model's name in reports; defaults to the method
    c.seed = 0
    # pipeline stage: an existing export (a workdir or its export/ directory) used instead of running the stage
    c.checkpoint = config_dict.placeholder(str)
    # Where compiled XLA programs are kept for reruns (flowjax/compile_cache.py): 'auto' ($JAX_COMPILATION_CACHE_DIR
    # if set, else <workdir>/compile_cache), a directory, or 'none'; a pipeline has its own (a stage's stays 'auto').
    c.compile_cache = compile_cache.AUTO

    c.data = ml_collections.ConfigDict()
    c.data.kind = 'toy2d'
    c.data.target = ml_collections.ConfigDict({'name': '8gaussians'})
    c.data.source = ml_collections.ConfigDict({'name': 'normal'})
    # Labelled images only: the class ids whose images every reader sees (training batches, forward
    # pairs, evaluation's real images); None: all (docs/methods.md, Rectified flow (1-RF)).
    c.data.classes = config_dict.placeholder(tuple)

    c.model = ml_collections.ConfigDict()
    c.model.name = 'mlp'
    c.model.features = (256, 256, 256)
    c.model.time_dim = 64
    c.model.dropout = 0.0

    # The objective every training method's loss reads (flows/objective.py): the time
    # distribution, the loss and its weighting; t_eps is where sampling starts.
    c.flow = objective.defaults()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 10_000
    c.train.batch_size = 512
    c.train.lr = 1e-3
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.weight_decay = 0.0  # > 0: AdamW, this decoupled decay (scaled by the rate) on every parameter; 0: Adam
    c.train.warmup_steps = 500
    c.train.lr_final = 1.0  # < 1: cosine decay to lr * lr_final at train.steps; 1: constant
    c.train.grad_clip = 1.0  # global-norm clipping; 0 disables
    c.train.ema_decay = 0.999
    c.train.ema_warmup = True  # decay min(ema_decay, (1 + n) / (10 + n)); False: ema_decay from step 1
    # A step whose loss or gradient norm is not finite changes nothing (params, Adam, EMA); then
    # 'stop' ends the run with that step's number (nothing after it is saved), 'skip' goes on.
    c.train.nonfinite = 'stop'
    c.train.log_every = 500
    c.train.checkpoint_every = 2_000
    c.train.keep_checkpoints = 2
    # Speed only (a resumed run may change them): steps per jit call (one lax.scan), what the
    # backward pass recomputes (train.REMAT: 'none', 'dots', 'full'), jit calls' batches read ahead.
    c.train.n_jitted_steps = 1
    c.train.remat = 'none'
    c.train.prefetch = 2

    # The LPIPS distance of any loss 'lpips': torchvision's VGG16 weights file (vgg16-397923af.pth),
    # the v0.1 linear heads (None: those inside an installed `lpips` package), the size both
    # images are resized to first (64: SlimFlow; 224: rfpp; None: as they are) and VGG's pooling.
    c.lpips = ml_collections.ConfigDict()
    c.lpips.vgg_weights = config_dict.placeholder(str)
    c.lpips.head_weights = config_dict.placeholder(str)
    c.lpips.resize = config_dict.placeholder(int)
    c.lpips.pool = 'max'

    c.eval = ml_collections.ConfigDict()
    c.eval.samplers = ('euler@1', 'euler@2', 'euler@4', 'euler@8', 'heun@4', 'rk45')
    c.eval.num_samples = 2000
    c.eval.rtol = 1e-5
    c.eval.atol = 1e-5
    c.eval.straightness_steps = 100
    c.eval.trajectories = 16
    # Images: the Frechet metric ('fid', 'fd_digits'; None: fd_digits on digits, else fid),
    # pytorch-fid's Inception weights file for fid, generation batch and grid size.
    c.eval.metric = config_dict.placeholder(str)
    c.eval.inception_weights = config_dict.placeholder(str)
    c.eval.batch_size = 256
    c.eval.grid = 64
    # Fidelity scores per sampler (docs/methods.md, Metrics), 0 / False: off. reconstruction: held-out real
    # examples inverted and regenerated; preservation (method 'evaluate'): the first stored pairs of
    # eval.couplings sampled from their x0; lpips: images also scored by LPIPS (the `lpips` section).
    c.eval.reconstruction = 0
    c.eval.preservation = 0
    c.eval.lpips = False
    # Classifier-free guidance scale of class-conditional models trained with model.label_dropout > 0, in
    # every sampler of the job (docs/methods.md, Guidance); 1: none.
    c.eval.guidance = 1.0
    # method 'evaluate': exports to compare (stage names or 'label=path'), and a coupling store
    # whose pair count and NFE go into the report.
    c.eval.models = ()
    c.eval.couplings = config_dict.placeholder(str)
    # method 'evaluate': group name -> tuple of model labels (as in the report), e.g. one recipe's
    # seeds, whose scores the report summarises as mean / std / min / max.
    c.eval.groups = ml_collections.ConfigDict()
    # method 'evaluate': name -> (group_a, group_b) of eval.groups whose i-th models are paired (e.g. the
    # same seed in two arms); the report gives the mean / spread of a - b per score and the paired t.
    c.eval.differences = ml_collections.ConfigDict()
    return c


def shrink_toy2d_for_local(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `runlocal` sizes of a toy-2D config: seconds on a CPU, for tests."""
    c.model.features = (32, 32)
    c.train.steps = 40
    c.train.batch_size = 64
    c.train.log_every = 10
    c.train.checkpoint_every = 20
    c.eval.num_samples = 256
    c.eval.straightness_steps = 16
    return c


def pipeline(**stages: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A pipeline config running the given stage configs in order (see flowjax/pipeline.py)."""
    c = ml_collections.ConfigDict()
    c.method = 'pipeline'
    c.stages = tuple(stages)
    c.compile_cache = compile_cache.AUTO  # the job's, for every stage (flowjax/compile_cache.py)
    for name, stage in stages.items():
        c[name] = stage
    return c


# The arms of `slimflow_pipeline`'s ablation: group name in the report -> stage name prefix.
# (a): the same small student by plain reflow vs annealing reflow; (b): the annealed student
# distilled without vs with the 2-step guidance term. (Reports list groups sorted by name.)
SLIMFLOW_ABLATION = {
    '(a) plain reflow, b = 0': 'plain',
    '(a) annealing reflow': 'annealed',
    '(b) distillation, L_d only': 'unguided',
    '(b) distillation, L_d + L_2step': 'guided',
}


def slimflow_pipeline(teacher: ml_collections.ConfigDict, couplings: ml_collections.ConfigDict,
                      student: ml_collections.ConfigDict, distill: ml_collections.ConfigDict,
                      evaluate: ml_collections.ConfigDict, *, seeds: int = 0) -> ml_collections.ConfigDict:
    """SlimFlow as a pipeline: teacher -> couplings -> annealed (slimflow_reflow) -> distilled
    (slimflow_distill) -> evaluate; the student and distill configs name their couplings stage.

    `seeds` > 0 makes the ablation instead: per seed s, the same student trained by plain reflow
    (b = 0: the stored couplings unmixed) as `plain_s<s>` and by annealing reflow as `annealed_s<s>`,
    and `annealed_s<s>` distilled with and without the 2-step term (`guided_s<s>`, `unguided_s<s>`);
    the evaluate stage reports every model and each arm's mean and spread (`eval.groups`).
    """
    if not seeds:
        distill.slimflow_distill.init = 'annealed'
        evaluate.eval.models = ('teacher', 'annealed', 'distilled')
        return pipeline(teacher=teacher, couplings=couplings, annealed=student, distilled=distill, evaluate=evaluate)

    def seeded(base, seed):
        c = copy.deepcopy(base)
        c.seed = seed
        return c

    stages = {'teacher': teacher, 'couplings': couplings}
    for s in range(seeds):
        stages[f'plain_s{s}'] = seeded(student, s)
        stages[f'plain_s{s}'].slimflow_reflow.beta.update(schedule='constant', value=0.0)
        stages[f'annealed_s{s}'] = seeded(student, s)
        stages[f'unguided_s{s}'] = seeded(distill, s)
        stages[f'unguided_s{s}'].slimflow_distill.update(init=f'annealed_s{s}', guidance=0.0)
        stages[f'guided_s{s}'] = seeded(distill, s)
        stages[f'guided_s{s}'].slimflow_distill.init = f'annealed_s{s}'
    evaluate.eval.models = tuple(name for name in stages if name != 'couplings')
    evaluate.eval.groups = {group: tuple(f'{prefix}_s{s}' for s in range(seeds))
                            for group, prefix in SLIMFLOW_ABLATION.items()}
    return pipeline(**stages, evaluate=evaluate)


def experiment(near, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the experiment file `<name>.py` beside the file `near` (an experiment's
    `__file__`, a str or path): one experiment builds on another's recipe without copying it."""
    return experiment_module(near, name).get_config(arg)


def experiment_module(near, name: str):
    """The experiment file `<name>.py` beside the file `near`, loaded as a module: one experiment
    uses another's helpers without copying them."""
    import importlib.util
    import pathlib

    path = pathlib.Path(near).with_name(f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'flowjax_experiment_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses 'runlocal,size=7' style experiment arguments against typed defaults.

    A bare name sets a bool default to True; `key=value` is converted to the default's type.
    """
    parsed = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or '').split(',')):
        key, has_value, value = item.partition('=')
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is unknown (expected one of {', '.join(defaults)})")
        kind = type(defaults[key])
        if not has_value:
            if kind is not bool:
                raise ValueError(f'config argument {key!r} needs a value ({key}=...)')
            parsed[key] = True
        elif kind is bool:
            parsed[key] = value.lower() in ('1', 'true', 'yes')
        else:
            parsed[key] = kind(value)
    return parsed
