"""flowjax command line: `python -m flowjax.main --config=experiments/toy2d_rf.py --workdir=runs/x`.

Flags, config, distributed initialisation, and dispatch to the method `config.method` names.
"""

import os
import socket
import sys
import tempfile
import time

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
    """True when launched as one of several processes: an explicit coordinator, SLURM, Open MPI, a GKE TPU
    pod, or FLOWJAX_DISTRIBUTED=1 (launch/tpu_pod.sh: a Cloud TPU VM pod, which JAX finds through its metadata)."""
    env = os.environ
    if env.get('JAX_COORDINATOR_ADDRESS') or env.get('FLOWJAX_DISTRIBUTED') == '1':
        return True
    for count in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
        if int(env.get(count, '1') or '1') > 1:
            return True
    return len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1


# How long a process other than 0 waits for the coordinator (process 0) to come up: jax.distributed's default.
COORDINATOR_WAIT_S = 300


def _explicit_process(env) -> tuple[str, int, int]:
    """(coordinator, process count, process id) from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""
    address = env['JAX_COORDINATOR_ADDRESS']
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit():
        fail(f'JAX_COORDINATOR_ADDRESS={address!r}: expected host:port, e.g. localhost:12355')
    values = {}
    for name in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
        value = env.get(name, '')
        if not value.strip().isdigit():
            fail(f'{name}={value!r}: expected a non-negative integer (JAX_COORDINATOR_ADDRESS is set)')
        values[name] = int(value)
    count, index = values['JAX_NUM_PROCESSES'], values['JAX_PROCESS_ID']
    if count < 1 or index >= count:
        fail(f'JAX_PROCESS_ID={index}, JAX_NUM_PROCESSES={count}: expected 0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES')
    return address, count, index


def _wait_for_coordinator(address: str, wait_s: float) -> None:
    """Returns once the coordinator's port accepts connections; a one-line error after `wait_s` seconds
    (JAX itself would abort the process with a C++ stack trace)."""
    host, _, port = address.rpartition(':')
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection((host.strip('[]'), int(port)), timeout=5):
                return
        except socket.gaierror as e:
            fail(f'JAX_COORDINATOR_ADDRESS={address}: unknown host {host!r} ({e.strerror})')
        except OSError as e:
            if time.monotonic() > deadline:
                fail(f'JAX_COORDINATOR_ADDRESS={address}: no coordinator answered within {wait_s:g} s '
                     f'({e.strerror or e}); is process 0 running there?')
            time.sleep(1)


def initialize_distributed() -> None:
    """`jax.distributed.initialize` when launched as one of several processes; a failure is one line.

    On the CPU platform the processes' collectives go over gloo (TCP), so the same command runs as N
    local processes (launch/local.sh) as on a cluster.
    """
    import jax

    if not multiprocess_environment():
        return
    env = os.environ
    if env.get('JAX_PLATFORMS', '').split(',')[0] == 'cpu' and not env.get('JAX_CPU_COLLECTIVES_IMPLEMENTATION'):
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    explicit = _explicit_process(env) if env.get('JAX_COORDINATOR_ADDRESS') else None
    try:
        if explicit:
            address, count, index = explicit
            if index > 0:
                _wait_for_coordinator(address, COORDINATOR_WAIT_S)
            jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
        else:
            jax.distributed.initialize()  # detects SLURM, Open MPI and Cloud TPU itself
        devices = jax.device_count()
    except Exception as e:  # coordinator unreachable, port taken, a cluster variable jax cannot read
        where = f'coordinator {explicit[0]}, process {explicit[2]} of {explicit[1]}' if explicit else 'auto-detected'
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        fail(f"distributed initialisation failed ({where}): {type(e).__name__}: {lines[0] if lines else ''}")
    logging.info('process %d of %d, %d devices in all', jax.process_index(), jax.process_count(), devices)


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
    import jax

    if jax.process_index() == 0:  # the one process that writes reports says where they are
        outputs = [name for name in ('report.md', 'report.json', 'samples.png', 'export', 'manifest.json')
                   if os.path.exists(os.path.join(workdir, name))]
        print(f"flowjax: {method} finished in {workdir}: {', '.join(outputs)}")


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
