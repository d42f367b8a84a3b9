"""Distributed start-up: `jax.distributed.initialize` when this process is one of several.

Launchers (launch/local.sh, launch/slurm.sbatch, launch/tpu_pod.sh) set the variables read here;
a failure is one line (`errors.UserError`), never JAX's C++ stack trace.
"""

import os
import socket
import time

from absl import logging

from flowjax import errors


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
        raise errors.UserError(f'JAX_COORDINATOR_ADDRESS={address!r}: expected host:port, e.g. localhost:12355')
    values = {}
    for name in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
        value = env.get(name, '')
        if not value.strip().isdigit():
            raise errors.UserError(f'{name}={value!r}: expected a non-negative integer '
                                   '(JAX_COORDINATOR_ADDRESS is set)')
        values[name] = int(value)
    count, index = values['JAX_NUM_PROCESSES'], values['JAX_PROCESS_ID']
    if count < 1 or index >= count:
        raise errors.UserError(f'JAX_PROCESS_ID={index}, JAX_NUM_PROCESSES={count}: '
                               'expected 0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES')
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
            raise errors.UserError(f'JAX_COORDINATOR_ADDRESS={address}: unknown host {host!r} ({e.strerror})') from None
        except OSError as e:
            if time.monotonic() > deadline:
                raise errors.UserError(f'JAX_COORDINATOR_ADDRESS={address}: no coordinator answered within '
                                       f'{wait_s:g} s ({e.strerror or e}); is process 0 running there?') from None
            time.sleep(1)


def initialize() -> None:
    """`jax.distributed.initialize` when launched as one of several processes; a failure is one line.

    On the CPU platform the processes' collectives go over gloo (TCP), so the same command runs as N
    local processes (launch/local.sh) as on a cluster.
    """
    import jax

    if not multiprocess_environment() or jax.distributed.is_initialized():  # a second run in one process
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
    except errors.UserError:
        raise
    except Exception as e:  # coordinator unreachable, port taken, a cluster variable jax cannot read
        where = f'coordinator {explicit[0]}, process {explicit[2]} of {explicit[1]}' if explicit else 'auto-detected'
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise errors.UserError(f"distributed initialisation failed ({where}): {type(e).__name__}: "
                               f"{lines[0] if lines else ''}") from None
    logging.info('process %d of %d, %d devices in all', jax.process_index(), jax.process_count(), devices)
