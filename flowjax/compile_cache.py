"""JAX's persistent compilation cache, on for every job: a rerun, resumed or preempted job loads the
programs an earlier run compiled instead of compiling them again (an image model's training step
takes minutes to compile on a GPU, seconds to load).

`config.compile_cache`, a top-level field (in a pipeline, the pipeline's own; a stage's is refused):

    'auto'         (default) $JAX_COMPILATION_CACHE_DIR when the environment names a directory,
                   else <workdir>/compile_cache: the experiment's root, shared by its stages
    a directory    that one: a local path (relative to the working directory) or a bucket path
    'none' or ''   off (None too)

Every process of a multi-process job is given the same --workdir, so all of them use one directory
(it must be one they all see, as the workdir is): JAX writes entries from process 0 only and every
process reads them. A program compiled in less than jax_persistent_cache_min_compile_time_secs (JAX's
1 s; $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS sets it) is not stored: loading it saves little (a
bucket read can cost as much), and the many small programs of a job (transfers, metrics, each
sampler's solve) would each leave a file. The entries are the compiled executables themselves, so a
job's results are the same with the cache as without it. The cache only saves time: a directory that
cannot be made or written is a warning, and the job runs uncached; the directory can be removed at
any time.
"""

import functools
import os
import tempfile

from absl import logging
from etils import epath

from flowjax import errors

FIELD = 'compile_cache'
AUTO = 'auto'
OFF = ('', 'none')
DIRNAME = 'compile_cache'  # under the workdir, for 'auto'
ENV = 'JAX_COMPILATION_CACHE_DIR'
# XLA's GPU autotuning cache, which JAX keeps inside the cache directory, reads and writes through
# XLA's own file layer: local paths only. It is turned off for a bucket unless the environment sets it.
XLA_CACHES_ENV = 'JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES'
# What JAX records once at the first compile after the cache is (re)set: the moment `setup`'s line is logged.
FIRST_COMPILE_EVENTS = ('/jax/compilation_cache/tasks_using_cache', '/jax/compilation_cache/task_disabled_cache')

_pending: list[str] = []  # the line `setup` left for the first compile to log
_listening = False  # whether `_log_pending` listens (registered once per process)


def location(config, workdir: str, environ=None) -> str | None:
    """The directory `config.compile_cache` names for a job in `workdir` (None: off); a value that is
    not a string is a ConfigError."""
    value = config.get(FIELD, AUTO)
    if value is None or (isinstance(value, str) and value.lower() in OFF):
        return None
    if not isinstance(value, str):
        raise errors.ConfigError(f"{FIELD}={value!r}: expected a directory, {AUTO!r} (${ENV} if set, else "
                                 f"<workdir>/{DIRNAME}) or 'none' (off)")
    environ = os.environ if environ is None else environ
    if value.lower() == AUTO:
        value = environ.get(ENV) or os.path.join(workdir, DIRNAME)
    return value if '://' in value else os.path.abspath(value)


def check_stages(config) -> None:
    """A pipeline's stages run in one process with one cache: a stage setting its own is refused."""
    for stage in config.get('stages') or ():
        value = config[stage].get(FIELD, AUTO) if stage in config else AUTO
        if not (isinstance(value, str) and value.lower() == AUTO):
            raise errors.ConfigError(f'{stage}.{FIELD}={value!r}: the compile cache is the whole job\'s; '
                                     f'set {FIELD} at the top level of the pipeline (--config.{FIELD}=...)')


def _unusable(path: str) -> str | None:
    """Why `path` cannot hold the cache (None: it can): it is created if missing, and a local one
    must take a new file."""
    try:
        if '://' in path:
            epath.Path(path).mkdir(parents=True, exist_ok=True)
        else:
            os.makedirs(path, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix='.flowjax-write-check-'):
                pass
    except Exception as e:  # noqa: BLE001 - OSError locally; a bucket's client raises its own
        lines = str(e).strip().splitlines()
        return getattr(e, 'strerror', None) or (lines[0] if lines else type(e).__name__)
    return None


@functools.cache
def _jax_xla_caches() -> str | None:
    """jax_persistent_cache_enable_xla_caches as it was before `use` first changed it."""
    import jax

    return jax.config.jax_persistent_cache_enable_xla_caches


def use(path: str | None) -> None:
    """Points JAX's persistent cache at `path` (None: off). JAX opens its cache at the first compile
    and keeps it, so it is reset here: the next compile opens the new one."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    xla_caches = _jax_xla_caches()
    if path is not None and '://' in path and XLA_CACHES_ENV not in os.environ:
        xla_caches = 'none'
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_enable_xla_caches', xla_caches)
    compilation_cache.reset_cache()


def _log_pending(event: str, **_) -> None:
    """A jax.monitoring listener: at the first compile, logs the line `setup` left."""
    if event in FIRST_COMPILE_EVENTS and _pending:
        logging.info(_pending.pop())


def setup(config, workdir: str) -> str | None:
    """Turns the persistent cache on in the directory `config.compile_cache` names (or off) for the
    job in `workdir`, before it compiles. Returns the directory (None: off). One line says where, logged
    at the job's first compile: a job its checks refuse prints its one error line only. A bad value is
    a ConfigError (before anything is made); a directory that cannot be made or written is a warning
    at once, and the cache is off. `python -m flowjax.main` calls it; a program that runs methods or
    pipelines itself may too."""
    global _listening
    import jax

    check_stages(config)
    path = location(config, workdir)
    if path is not None and not jax.config.jax_enable_compilation_cache:
        line, path = 'compile cache: off (jax_enable_compilation_cache is False)', None
    elif path is not None and (problem := _unusable(path)):
        logging.warning('compile cache: cannot use %s (%s); compiling without it', path, problem)
        line, path = None, None
    else:
        line = f"compile cache: {path or f'off ({FIELD}={config.get(FIELD)!r})'}"
    if not _listening:
        jax.monitoring.register_event_listener(_log_pending)
        _listening = True
    _pending[:] = [line] if line else []
    use(path)
    return path
