"""flowjax command line: `python -m flowjax.main --config=experiments/toy2d_rf.py --workdir=runs/x`.

Flags, config, distributed initialisation, and dispatch to the method `config.method` names.
"""

import os
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from flowjax import errors, evaluate, generate, pipeline
from flowjax.methods import distill, reflow, rf, slimflow

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file, e.g. experiments/toy2d_rf.py:runlocal',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory (or bucket path) for checkpoints, exports and reports.')

# method name -> runner(config, workdir)
METHODS = {
    'rf': rf.run,
    'generate': generate.run,
    'reflow': reflow.run,
    'distill': distill.run,
    'slimflow_reflow': slimflow.run_reflow,
    'slimflow_distill': slimflow.run_distill,
    'evaluate': evaluate.run,
    'pipeline': lambda config, workdir: pipeline.run(config, workdir, METHODS, CHECKS),
}
# method name -> static config check (no file access), run on every stage before a pipeline starts
CHECKS = {
    'rf': rf.check,
    'generate': generate.check,
    'reflow': reflow.check,
    'distill': distill.check,
    'slimflow_reflow': slimflow.check_reflow,
    'slimflow_distill': slimflow.check_distill,
    'evaluate': evaluate.check,
}


def fail(message: str) -> None:
    """Reports bad input as one line on stderr and exits with status 2."""
    print(f"flowjax: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def stopped(e: errors.Preempted) -> None:
    """Reports a run stopped by a signal (progress saved) as one line and exits with 128 + the signal:
    143 for SIGTERM, the status a shell gives a process that SIGTERM killed, so a scheduler (SLURM,
    Kubernetes, a TPU queue) counts the job as terminated by its preemption notice and requeues it
    rather than marking it failed; 130 for Ctrl-C."""
    print(f"flowjax: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(128 + e.signum)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config-override mistakes reported as one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
        if 'Traceback' in message:  # the experiment file raised: its own message, not the traceback
            last = message.strip().replace('\\n', '\n').splitlines()[-1]
            message = f"{message.split(':', 1)[0]}: {last.split(': ', 1)[-1]}"
        fail(message.replace('\\n', ' ').replace("'", ''))
    except (KeyError, AttributeError, TypeError, ValueError) as e:  # typo'd --config.a.b field, bad literal
        fail(f"bad --config override: {str(e).replace(chr(92) + 'n', ' ')}")


def multiprocess_environment() -> bool:
    """True when launched as one of several processes (explicit coordinator, SLURM, MPI, TPU pod)."""
    env = os.environ
    if env.get('JAX_COORDINATOR_ADDRESS'):
        return True
    for count in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
        if int(env.get(count, '1') or '1') > 1:
            return True
    return len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1


def initialize_distributed() -> None:
    import jax

    if not multiprocess_environment():
        return
    env = os.environ
    if env.get('JAX_COORDINATOR_ADDRESS'):
        jax.distributed.initialize(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                                   num_processes=int(env['JAX_NUM_PROCESSES']),
                                   process_id=int(env['JAX_PROCESS_ID']))
    else:
        jax.distributed.initialize()  # detects SLURM, Open MPI and Cloud TPU itself
    logging.info('process %d of %d, %d devices in all', jax.process_index(), jax.process_count(),
                 jax.device_count())


def check_workdir(workdir: str) -> None:
    """A local workdir must be a directory this process can create files in (checked before any work)."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix='.flowjax-write-check-'):
            pass
    except OSError as e:
        fail(f'--workdir={workdir}: cannot write there ({e.strerror or e}); expected a writable directory')


class _QuietLibraries:
    """Hides the INFO chatter of checkpointing internals and backend probing (warnings still show)."""

    def filter(self, record) -> bool:
        return record.levelno > 20 or not any(part in record.pathname for part in ('/orbax/', 'xla_bridge'))


def main(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        fail(f"unexpected arguments {' '.join(argv[1:])!r}")
    if _CONFIG.value is None:
        fail('--config is required, e.g. --config=experiments/toy2d_rf.py')
    try:
        config = _CONFIG.value
        method = config.method
    except Exception as e:  # the config file is missing or raised while loading
        fail(f'--config: {e}')
    if not _WORKDIR.value:
        fail('--workdir is required, e.g. --workdir=runs/my-experiment')
    if method not in METHODS:
        fail(f"config.method: unknown method {method!r} (expected one of {', '.join(METHODS)})")
    if method != 'pipeline' and config.get('checkpoint'):
        fail('checkpoint: only a pipeline stage can stand in for an existing export '
             '(set <stage>.checkpoint in a pipeline)')
    workdir = _WORKDIR.value
    if '://' not in workdir:  # local paths absolute (Orbax needs it); bucket paths as given
        workdir = os.path.abspath(workdir)
        check_workdir(workdir)
    initialize_distributed()
    try:
        METHODS[method](config, workdir)
    except errors.UserError as e:
        fail(str(e))
    except errors.Preempted as e:
        stopped(e)
    outputs = [name for name in ('report.md', 'report.json', 'samples.png', 'export', 'manifest.json')
               if os.path.exists(os.path.join(workdir, name))]
    print(f"flowjax: {method} finished in {workdir}: {', '.join(outputs)}")


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
