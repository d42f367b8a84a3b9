"""What a method declares: its name, its config section, the fields that name earlier pipeline
stages, the shared sections it reads, a static `check` and its runner.

Every method (training objectives, the coupling pass, evaluation) is one module ending in

    METHOD = method.Method(name='reflow', run=run, check=check, section=defaults,
                           references=('reflow.couplings', 'reflow.init'))

and `flowjax/methods/table.py` lists them. main's dispatch, the pipeline's references and the
config sections all come from that table, so adding a method is one module, one line in the
table and its experiment file.

A stage's identity (its pipeline fingerprint and the resume check of its checkpoints) covers
only the top-level fields and the sections it reads: another method's fields are not in its
config at all, and a shared section it does not read (e.g. `train` for the coupling pass) does
not change it.
"""

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import ml_collections

from flowjax import configs
from flowjax.flows import objective

# The shared sections of `configs.base()` a training method reads; 'lpips' only when its loss or
# its evaluation uses the LPIPS network (`Method.sections`).
TRAINING_READS = ('data', 'model', 'flow', 'train', 'eval')

# Fields added after checkpoints and pipelines were written, with the value that means "unused"
# (what the code before them did). `identity` leaves such a field out while it holds that value,
# and drops a section left empty by that, so a stage that does not use it keeps its pipeline
# fingerprint; a checkpoint's config that lacks it still matches (`default_identity`).
LATER_FIELDS = {'data.classes': None, 'rf.init': None, 'eval.guidance': 1.0, 'generate.guidance': 1.0}

# Top-level fields that say how a job runs, not what a stage makes: never part of its identity, so
# setting or changing them reruns nothing and a checkpoint made before them still resumes.
JOB_FIELDS = ('compile_cache',)


def flow_uses_lpips(config: ml_collections.ConfigDict) -> bool:
    """Whether the config's flow loss needs the LPIPS network (then `config.lpips` is read)."""
    return 'flow' in config and config.flow.get('loss') in objective.LPIPS_LOSSES


def eval_uses_lpips(config: ml_collections.ConfigDict) -> bool:
    """Whether the evaluation scores reconstructions or stored pairs with LPIPS (`eval.lpips`; then
    `config.lpips` is read): only when it runs (eval.samplers) and has something to score."""
    ev = config.get('eval')
    return (ev is not None and ev.get('lpips') is True and bool(ev.get('samplers'))
            and any(ev.get(field) for field in ('reconstruction', 'preservation')))


def uses_lpips(config: ml_collections.ConfigDict) -> bool:
    """Whether a training method's config uses the LPIPS network: in its loss or in its evaluation."""
    return flow_uses_lpips(config) or eval_uses_lpips(config)


@dataclasses.dataclass(frozen=True)
class Method:
    """A method of `config.method`.

    run:        `(config, workdir) -> result dict` (written to the stage's stage.json).
    check:      `(config) -> options`, static checks touching no files (a pipeline checks every
                stage before the first runs); returns the method's typed, frozen options.
    section:    `() -> ConfigDict`, the defaults of the method's own section `config.<name>`
                (None: the method has no section).
    references: dotted fields that may name an earlier pipeline stage (a teacher, a coupling
                store, models to evaluate); the pipeline replaces those names by directories.
    reads:      the shared sections of `configs.base()` the method reads.
    lpips:      `(config) -> bool`: whether this config uses the LPIPS network (then the
                `lpips` section is read too).
    reserved:   entries of a tuple reference that name neither a stage nor a path and are
                left as they are (invert.models' 'analytic').
    """

    name: str
    run: Callable[[ml_collections.ConfigDict, str], dict]
    check: Callable[[ml_collections.ConfigDict], Any]
    section: Callable[[], ml_collections.ConfigDict] | None = None
    references: tuple[str, ...] = ()
    reads: tuple[str, ...] = TRAINING_READS
    lpips: Callable[[ml_collections.ConfigDict], bool] = uses_lpips
    reserved: tuple[str, ...] = ()

    def defaults(self) -> ml_collections.ConfigDict:
        """`configs.base()` with this method selected and its own section added."""
        c = configs.base()
        c.method = self.name
        if self.section is not None:
            c[self.name] = self.section()
        return c

    def sections(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """The config sections that make up a stage of this method: those it reads, its own."""
        uses_lpips = 'lpips' in config and self.lpips(config)
        own = (self.name,) if self.section is not None else ()
        return (*self.reads, *(('lpips',) if uses_lpips else ()), *own)

    def identity(self, config: ml_collections.ConfigDict) -> dict:
        """The part of `config` that defines this stage's outputs, as plain JSON data: every
        top-level field that is not a section or one of JOB_FIELDS, and the sections it reads
        (`sections`), less the LATER_FIELDS at their unused value."""
        data = json.loads(config.to_json())
        keep = set(self.sections(config))
        out = {k: v for k, v in data.items() if (not isinstance(v, dict) or k in keep) and k not in JOB_FIELDS}
        for field, unused in LATER_FIELDS.items():
            section, name = field.split('.')
            if isinstance(out.get(section), dict) and name in out[section] and out[section][name] == unused:
                del out[section][name]
                if not out[section]:
                    del out[section]
        return out

    def default_identity(self) -> dict:
        """`identity` of the defaults: what an older checkpoint that lacks a field is compared with."""
        return self.identity(self.defaults())
