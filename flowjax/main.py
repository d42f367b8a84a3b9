"""flowjax command line: `python -m flowjax.main --config=experiments/toy2d_rf.py --workdir=runs/x`.

Flags and config overrides; the checks, the compilation cache, distributed initialisation and the dispatch to the
method `config.method` names are flowjax/experiment.py's (what `flowjax.run` calls too).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from flowjax import distributed, errors, experiment

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file, e.g. experiments/toy2d_rf.py:runlocal',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory (or bucket path) for checkpoints, exports and reports.')


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


def start_distributed() -> None:
    """`distributed.initialize()`, a failure reported as one line."""
    try:
        distributed.initialize()
    except errors.UserError as e:
        fail(str(e))


class _QuietLibraries:
    """Hides the INFO chatter of checkpointing internals, backend probing and JAX's cache (warnings still show)."""

    def filter(self, record) -> bool:
        quiet = ('/orbax/', 'xla_bridge', 'compilation_cache')
        return record.levelno > 20 or not any(part in record.pathname for part in quiet)


def main(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        fail(f"unexpected arguments {' '.join(argv[1:])!r}")
    if _CONFIG.value is None:
        fail('--config is required, e.g. --config=experiments/toy2d_rf.py')
    config = _CONFIG.value
    try:
        method, workdir = experiment.prepare(config, _WORKDIR.value)
        experiment.run(config, workdir, method)
    except errors.UserError as e:
        fail(str(e))
    except errors.Preempted as e:
        stopped(e)
    import jax

    if jax.process_index() == 0:  # the one process that writes reports says where they are
        outputs = [name for name in ('report.md', 'report.json', 'samples.npz', 'samples.png', 'export', 'manifest.json')
                   if os.path.exists(os.path.join(workdir, name))]
        print(f"flowjax: {method} finished in {workdir}: {', '.join(outputs)}")


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
