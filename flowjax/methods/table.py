"""The table of methods: `config.method` -> its `method.Method` declaration.

main dispatches through it, the pipeline resolves each stage's declared references and checks
every stage with it, and `config(name)` builds a method's full default config (the shared
sections of `configs.base()` plus the method's own). Adding a method is one module declaring
`METHOD` and one line here.
"""

import copy

import ml_collections

from flowjax import evaluate, generate
from flowjax.methods import (caf, compare, ddpm, distill, edit, invert, method, perflow, reflow, rf, sample,
                             slimflow_distill, slimflow_reflow, transfer)

METHODS: dict[str, method.Method] = {m.name: m for m in (
    rf.METHOD,
    generate.METHOD,
    reflow.METHOD,
    distill.METHOD,
    slimflow_reflow.METHOD,
    slimflow_distill.METHOD,
    caf.METHOD,
    ddpm.METHOD,
    perflow.METHOD,
    transfer.METHOD,
    evaluate.METHOD,
    invert.METHOD,
    edit.METHOD,
    sample.METHOD,
    compare.METHOD,
)}
PIPELINE = 'pipeline'  # a list of stages (flowjax/pipeline.py), dispatched by main


def config(name: str) -> ml_collections.ConfigDict:
    """The default config of method `name`: what an experiment file starts from."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (expected one of {', '.join(METHODS)})")
    return METHODS[name].defaults()


def for_method(stage: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """A copy of `stage` (e.g. a teacher's stage config) run as method `name`: the same shared
    sections, `name`'s own section at its defaults, no other method's section. Experiments build a
    student's stage from the teacher's this way."""
    c = copy.deepcopy(stage)
    for other in METHODS:
        if other != name and other in c:
            del c[other]
    c.method = name
    if METHODS[name].section is not None and name not in c:
        c[name] = METHODS[name].section()
    return c
