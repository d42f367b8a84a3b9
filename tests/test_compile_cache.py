"""The persistent compilation cache (flowjax/compile_cache.py): where each `compile_cache` value puts
it, switching directories and turning it off in one process, a job run again from a filled cache in
a fresh process loading every program and giving the same bits, and stage identities unchanged."""

import json
import logging
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import ROOT, experiment_config
from flowjax import checkpoint, compile_cache, configs, errors, pipeline
from flowjax.methods import table


def _entries(path) -> list[str]:
    """The cache entries (one file per compiled program) in `path`."""
    return sorted(p.name for p in path.glob('*-cache')) if path.exists() else []


def test_each_value_names_its_directory(tmp_path):
    config, work, shared = configs.base(), str(tmp_path / 'run'), {compile_cache.ENV: '/shared/xla'}
    assert compile_cache.location(config, work, environ={}) == os.path.join(work, 'compile_cache')
    assert compile_cache.location(config, 'gs://bucket/run', environ={}) == 'gs://bucket/run/compile_cache'
    assert compile_cache.location(config, work, environ=shared) == '/shared/xla'  # the environment's, as JAX's own
    assert compile_cache.location(config, work, environ={compile_cache.ENV: ''}) == os.path.join(work, 'compile_cache')
    config.compile_cache = 'xla'  # a path given wins over the environment's; relative to the working directory
    assert compile_cache.location(config, work, environ=shared) == os.path.abspath('xla')
    config.compile_cache = 'gs://bucket/xla'
    assert compile_cache.location(config, work, environ=shared) == 'gs://bucket/xla'
    for off in ('none', 'None', '', None):
        config.compile_cache = off
        assert compile_cache.location(config, work, environ=shared) is None
    assert configs.pipeline(a=configs.base()).compile_cache == 'auto'
    hand_built = ml_collections.ConfigDict(dict(configs.base().to_dict(), compile_cache=8))
    with pytest.raises(errors.ConfigError, match=r"^compile_cache=8: expected a directory, 'auto'"):
        compile_cache.location(hand_built, work)


@pytest.fixture
def session_cache():
    """Puts JAX's cache back as the test session had it (conftest's directory and threshold)."""
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    yield
    jax.config.update('jax_persistent_cache_min_compile_time_secs', before[1])
    compile_cache.use(before[0])


def test_one_process_switches_directories_and_turns_it_off(tmp_path, session_cache, caplog):
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    programs = iter(range(1000, 2000))

    def compile_new() -> None:  # a program this process has not compiled before
        n = next(programs)
        jax.jit(lambda x: x * n + 1).lower(jax.ShapeDtypeStruct((3,), jnp.float32)).compile()

    def logged() -> list[tuple[int, str]]:
        lines = [(r.levelno, r.getMessage()) for r in caplog.records if 'compile cache' in r.getMessage()]
        caplog.clear()
        return lines

    caplog.set_level(logging.INFO)
    config = configs.base()
    config.compile_cache = str(tmp_path / 'a')
    assert compile_cache.setup(config, str(tmp_path)) == str(tmp_path / 'a')
    assert logged() == []  # said at the first compile, so a job its checks refuse prints only its error
    compile_new()
    compile_new()
    assert logged() == [(logging.INFO, f'compile cache: {tmp_path}/a')]
    first = _entries(tmp_path / 'a')
    assert len(first) == 2
    config.compile_cache = str(tmp_path / 'b')  # e.g. a second job with its own workdir
    compile_cache.setup(config, str(tmp_path))
    compile_new()
    compile_new()
    assert len(_entries(tmp_path / 'b')) == 2 and _entries(tmp_path / 'a') == first
    config.compile_cache = 'none'
    assert compile_cache.setup(config, str(tmp_path)) is None and jax.config.jax_compilation_cache_dir is None
    compile_new()
    assert len(_entries(tmp_path / 'b')) == 2 and _entries(tmp_path / 'a') == first
    assert logged() == [(logging.INFO, f'compile cache: {tmp_path}/b'), (logging.INFO, "compile cache: off "
                                                                                      "(compile_cache='none')")]
    compile_cache.use('gs://bucket/xla')  # XLA's own caches (GPU autotuning) read local paths only: off
    assert jax.config.jax_persistent_cache_enable_xla_caches == 'none'
    # A directory that cannot be made: one warning, and the cache off (never half on).
    (tmp_path / 'a_file').write_text('not a directory')
    config.compile_cache = str(tmp_path / 'a_file' / 'cache')
    assert compile_cache.setup(config, str(tmp_path)) is None
    assert logged() == [(logging.WARNING, f'compile cache: cannot use {tmp_path}/a_file/cache (Not a directory); '
                                          'compiling without it')]
    assert jax.config.jax_compilation_cache_dir is None
    assert jax.config.jax_persistent_cache_enable_xla_caches != 'none'
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # JAX warns of a cache it cannot read or write
        compile_new()
    assert logged() == []


def _main(workdir, *args, env_cache=None) -> subprocess.CompletedProcess:
    """toy2d_rf:runlocal (two samplers) in a fresh process, every program stored in the cache
    (no compile-time threshold), the environment naming the cache directory `env_cache` (or none)."""
    env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV}
    env.update(XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu',
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
    if env_cache is not None:
        env[compile_cache.ENV] = str(env_cache)
    result = subprocess.run([sys.executable, '-m', 'flowjax.main', '--config=experiments/toy2d_rf.py:runlocal',
                             f'--workdir={workdir}', '--config.eval.samplers=("euler@2","rk45")', *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    return result


def _outputs(workdir) -> tuple[str, list[np.ndarray]]:
    params, _ = checkpoint.load_export(workdir)
    return (workdir / 'report.json').read_text(), jax.tree.leaves(params)


def test_a_job_run_from_a_filled_cache_loads_every_program_and_gives_the_same_bits(tmp_path):
    first = _main(tmp_path / 'a')  # the default: <workdir>/compile_cache
    cache = tmp_path / 'a' / 'compile_cache'
    entries = _entries(cache)
    assert entries and f'compile cache: {cache}' in first.stderr
    _main(tmp_path / 'b', f'--config.compile_cache={cache}')  # another workdir, so nothing is skipped
    assert _entries(cache) == entries  # every program loaded: one compiled would have been stored
    _main(tmp_path / 'c', '--config.compile_cache=none', env_cache=tmp_path / 'env')
    assert not (tmp_path / 'c' / 'compile_cache').exists() and not (tmp_path / 'env').exists()
    report, params = _outputs(tmp_path / 'a')
    for other in ('b', 'c'):
        other_report, other_params = _outputs(tmp_path / other)
        assert other_report == report
        for a, b in zip(params, other_params, strict=True):
            np.testing.assert_array_equal(a, b)


def _without_field(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The pipeline config as the code before `compile_cache` made it: the field nowhere."""
    data = config.to_dict()
    for section in (data, *(data[stage] for stage in data['stages'])):
        del section['compile_cache']
    return ml_collections.ConfigDict(data)


def test_the_cache_leaves_every_stage_identity():
    """Stage fingerprints (stage.json) and checkpoints' resume checks are what they were before the
    field existed, whatever its value; a stage's own value is refused."""
    config = experiment_config('toy2d_reflow', 'runlocal')
    old = pipeline.plan(_without_field(config), 'runs/r').fingerprints
    assert pipeline.plan(config, 'runs/r').fingerprints == old
    config.compile_cache = 'gs://bucket/xla'
    assert pipeline.plan(config, 'runs/r').fingerprints == old
    for name in ('rf', 'reflow', 'distill'):  # the methods that checkpoint
        method = table.METHODS[name]
        saved = json.loads(table.config(name).to_json())
        del saved['compile_cache']  # a checkpoint's config from before the field
        current = table.config(name)
        current.compile_cache = 'none'
        assert 'compile_cache' not in method.identity(current)
        assert checkpoint.config_difference(saved, method.identity(current), method.default_identity()) is None
        assert checkpoint.config_difference(saved, json.loads(current.to_json())) is None  # a whole-config check
    config.teacher.compile_cache = '/elsewhere'
    with pytest.raises(errors.ConfigError, match=r"^teacher.compile_cache='/elsewhere': .* top level of the pipeline"):
        pipeline.plan(config, 'runs/r')
