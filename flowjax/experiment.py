"""An experiment as `python -m flowjax.main` runs it: its config loaded from a file, then checked and run in a
workdir. main.py adds only the flags, `--config.x.y=` overrides and the exit statuses; `flowjax.run` and
`flowjax.config` (flowjax/api.py) call the same functions, so a notebook run is a command-line run.
"""

import os
import tempfile
from typing import Any

import ml_collections
from ml_collections.config_flags import config_flags

from flowjax import compile_cache, distributed, errors, pipeline
from flowjax.methods import table


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The locked config of an experiment file spec 'path.py[:arg]', as `--config=` loads it (a field can be
    changed, a misspelt one is an error); a missing file or a failing `get_config` is a one-line UserError."""
    if not isinstance(spec, str) or not spec:
        raise errors.UserError(f'--config={spec!r}: expected an experiment file, e.g. experiments/toy2d_rf.py:runlocal')
    path = spec.split(':', 1)[0]
    if not os.path.isfile(path):
        raise errors.UserError(f'--config={spec}: no experiment file {path!r} here (expected a .py file defining '
                               'get_config(arg))')
    try:
        config = config_flags.ConfigFileFlagParser(name='config', lock_config=True).parse(spec)
    except (TypeError, ValueError) as e:  # get_config raised: its own message, not the traceback
        last = str(e).strip().splitlines()[-1]  # config_flags puts the traceback in the message
        raise errors.UserError(f"--config={spec}: {last.split(': ', 1)[-1]}") from None
    return config


def check_workdir(workdir: str) -> None:
    """A local workdir must be a directory this process can create files in (checked before any work)."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix='.flowjax-write-check-'):
            pass
    except OSError as e:
        raise errors.UserError(f'--workdir={workdir}: cannot write there ({e.strerror or e}); expected a writable '
                               'directory') from None


def prepare(config: Any, workdir: str | None) -> tuple[str, str]:
    """(method, workdir made absolute when local) of a run of `config` in `workdir`, checked before anything
    runs: the config loaded, a workdir given and writable, the method known; bad input is a one-line UserError."""
    try:
        method = config.method
    except Exception as e:  # the config file is missing or raised while loading
        raise errors.UserError(' '.join(f'--config: {e}'.split())) from None
    if not workdir:
        raise errors.UserError('--workdir is required, e.g. --workdir=runs/my-experiment')
    if method not in table.METHODS and method != table.PIPELINE:
        raise errors.UserError(f"config.method: unknown method {method!r} (expected one of {', '.join(table.METHODS)}, "
                               'pipeline)')
    if method != table.PIPELINE and config.get('checkpoint'):
        raise errors.UserError('checkpoint: only a pipeline stage can stand in for an existing export '
                               '(set <stage>.checkpoint in a pipeline)')
    workdir = str(workdir)
    if '://' not in workdir:  # local paths absolute (Orbax needs it); bucket paths as given
        workdir = os.path.abspath(workdir)
        check_workdir(workdir)
    return method, workdir


def run(config: ml_collections.ConfigDict, workdir: str, method: str) -> Any:
    """Runs the checked experiment (`prepare`): the compilation cache set up before anything compiles (every
    process is given the same workdir, so one directory serves them all), the processes started, then the
    pipeline or the method; returns what it returns. Bad input is a UserError, a stopping signal Preempted."""
    compile_cache.setup(config, workdir)
    distributed.initialize()
    if method == table.PIPELINE:
        return pipeline.run(config, workdir)
    return table.METHODS[method].run(config, workdir)
