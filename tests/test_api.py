"""The Python API (flowjax/api.py) and the safetensors round trip (flowjax/interop/safetensors_io.py).

README.md's section "Python API (a notebook session)" is run as written (a doctest of its `>>>` lines), so the
README stays true; the other tests use random exports of every model kind (no training).
"""

import doctest
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from conftest import ROOT, experiment_config, random_export
from flowjax import api, checkpoint, errors, train
from flowjax.interop import safetensors_io
from flowjax.methods import caf, ddpm, perflow
from flowjax.models import kinds

SECTION = '## Python API (a notebook session)'


def readme_session() -> str:
    """The text of README.md's Python API section (up to the next section)."""
    text = (ROOT / 'README.md').read_text()
    start = text.index(SECTION)
    end = text.find('\n## ', start + len(SECTION))
    return text[start:] if end < 0 else text[start:end]


def test_readme_session_runs_as_written(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))  # the session's mkdtemp() under tmp_path
    session = doctest.DocTestParser().get_doctest(readme_session(), {}, 'README.md (Python API)', 'README.md', 0)
    assert len(session.examples) >= 20, 'the README section lost its session'
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(session)
    assert runner.summarize(verbose=False).failed == 0


# (kind, stage config, kind of it, sample shape, a sampler that applies): every kind an export can hold
def _stages():
    rf_stage = experiment_config('toy2d_rf', 'runlocal')
    caf_stage = experiment_config('caf_toy2d', 'runlocal').caf
    pf_stage = experiment_config('perflow_toy2d', 'runlocal').perflow_k4
    ddpm_stage = experiment_config('ddpm_toy2d', 'runlocal')
    return {
        'velocity': (rf_stage, kinds.from_config(rf_stage), 'euler@2'),
        'caf': (caf_stage, caf.kind_of(caf_stage), 'caf@2'),
        'piecewise': (pf_stage, perflow.kind_of(pf_stage), 'euler@4'),
        'ddpm': (ddpm_stage, ddpm.kind_of(ddpm_stage), 'ddim@2'),
    }


def _random_export(stage, kind, path, shape=(2,), dtype=None) -> str:
    """An export of `kind` at small random weights (each leaf its own values), as its training writes it."""
    abstract = jax.eval_shape(lambda key: kind.init(key, shape), jax.random.key(0))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(dtype or a.dtype), abstract)
    checkpoint.export(path, params, train.export_meta(stage, kind, shape, 7))
    return str(path)


@pytest.mark.parametrize('name', ['velocity', 'caf', 'piecewise', 'ddpm'])
def test_safetensors_round_trip_of_every_kind(tmp_path, name):
    stage, kind, sampler = _stages()[name]
    export = _random_export(stage, kind, tmp_path / 'trained')
    file = safetensors_io.export_to_file(export, tmp_path / 'model.safetensors')
    written = safetensors_io.file_to_export(file, tmp_path / 'imported')
    assert written == checkpoint.export_dir(tmp_path / 'imported')

    params, meta = checkpoint.load_export(export)
    names = safetensors_io.flatten(params)
    assert all(n.startswith('params/') for n in names)
    if name == 'caf':  # the two networks side by side
        assert {n.split('.')[0] for n in names} == {'params/velocity', 'params/acceleration'}
    for copy in (api.load(file), api.load(written)):
        assert copy.meta == meta and copy.kind == kind
        assert jax.tree.structure(copy.params) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(copy.params), jax.tree.leaves(params)):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    original = api.load(export).sample(16, sampler, seed=3)
    assert np.isfinite(original).all() and original.std() > 0
    assert np.array_equal(api.load(file).sample(16, sampler, seed=3), original)
    assert np.array_equal(api.load(written).sample(16, sampler, seed=3), original)


def test_safetensors_keeps_the_stored_dtype(tmp_path):
    stage, kind, _ = _stages()['velocity']
    export = _random_export(stage, kind, tmp_path / 'bf16', dtype=jax.numpy.bfloat16)
    params, _ = safetensors_io.load(safetensors_io.export_to_file(export, tmp_path / 'm.safetensors'))
    stored, _ = checkpoint.load_export(export)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(stored)):
        assert a.dtype == b.dtype == jax.numpy.bfloat16 and np.array_equal(a.view(np.uint16), b.view(np.uint16))


def test_safetensors_bad_files(tmp_path):
    from safetensors.numpy import save_file

    stage, kind, _ = _stages()['velocity']
    export = _random_export(stage, kind, tmp_path / 'trained')
    good = safetensors_io.export_to_file(export, tmp_path / 'good.safetensors')
    params, meta = safetensors_io.load(good)
    flat = safetensors_io.flatten(params)
    (tmp_path / 'text.safetensors').write_text('not tensors')
    save_file(flat, str(tmp_path / 'bare.safetensors'))
    wrong = dict(flat, **{'params/params.out.kernel': np.zeros((3, 2), np.float32)})
    save_file(wrong, str(tmp_path / 'shape.safetensors'), metadata={safetensors_io.META_KEY: __import__('json').dumps(meta)})
    cases = {'text': 'not a safetensors file', 'bare': 'without flowjax meta',
             'shape': "tensor 'params/params.out.kernel' has shape [3, 2]"}
    for stem, fragment in cases.items():
        with pytest.raises(errors.UserError, match=fragment.replace('[', r'\[').replace(']', r'\]')):
            safetensors_io.load(tmp_path / f'{stem}.safetensors')
    with pytest.raises(errors.UserError, match='exists'):
        safetensors_io.export_to_file(export, good)  # never replaced
    with pytest.raises(errors.UserError, match='exists; import into another directory'):
        safetensors_io.file_to_export(good, tmp_path / 'trained')


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """A random toy velocity model, loaded."""
    return api.load(random_export(experiment_config('toy2d_rf', 'runlocal'), tmp_path_factory.mktemp('toy') / 'w'))


def test_sample_is_per_row_deterministic_and_sharded(toy):
    x = toy.sample(50, 'euler@4', seed=1)
    assert x.shape == (50, 2) and x.dtype == np.float32
    assert np.array_equal(toy.sample(50, 'euler@4', seed=1, batch_size=24), x)  # 3 batches of 24 (on 8 devices)
    assert np.array_equal(toy.sample(20, 'euler@4', seed=1), x[:20])
    assert np.array_equal(toy.sample_from(toy.noise(50, seed=1), 'euler@4'), x)
    assert not np.array_equal(toy.sample(50, 'euler@4', seed=2), x)
    assert toy.draw_labels(5) is None


def test_invert_reconstruct_and_velocity(toy):
    z = toy.noise(32, seed=0)
    x = toy.sample_from(z, 'midpoint@8')
    assert np.abs(toy.invert(x, 'midpoint@8') - z).max() < 1e-3
    assert np.abs(toy.reconstruct(x, 'midpoint@8') - x).max() < 1e-3
    v = toy.velocity(x, 0.25)
    direct = toy.kind.velocity(toy.params)(x, np.full((32,), 0.25, np.float32))
    np.testing.assert_allclose(v, np.asarray(direct), rtol=1e-5, atol=1e-6)
    per_row = toy.velocity(x, np.linspace(0, 1, 32))
    assert per_row.shape == (32, 2) and not np.allclose(per_row, v)


@pytest.mark.parametrize('call, fragment', [
    (lambda m: m.sample(0), 'n=0: expected an integer >= 1'),
    (lambda m: m.sample(2.5), 'n=2.5'),
    (lambda m: m.sample(4, 'eulr@4'), "sampler 'eulr@4': unknown solver 'eulr'"),
    (lambda m: m.sample(4, 'ddim@4'), "sampler 'ddim@4': does not apply to the model"),
    (lambda m: m.sample(4, labels=1), 'labels: the model .* is not class-conditional'),
    (lambda m: m.sample(4, guidance=2.0), 'guidance=2: the model .* is not class-conditional'),
    (lambda m: m.sample(4, seed=-1), 'seed=-1'),
    (lambda m: m.sample(4, batch_size=0), 'batch_size=0'),
    (lambda m: m.invert(np.zeros((4, 3))), r'x: shape \[4, 3\] does not fit the model: expected \(N, 2\)'),
    (lambda m: m.velocity(np.zeros((4, 2)), np.zeros(3)), 't: expected a finite time or 4 of them'),
])
def test_bad_arguments_are_one_line(toy, call, fragment):
    with pytest.raises(errors.UserError, match=fragment) as e:
        call(toy)
    assert '\n' not in str(e.value)


def test_velocity_of_a_kind_without_one(tmp_path):
    stage, kind, _ = _stages()['caf']
    model = api.load(_random_export(stage, kind, tmp_path / 'caf'))
    with pytest.raises(errors.UserError, match="kind 'caf', which has no velocity of"):
        model.velocity(np.zeros((2, 2)), 0.5)


def test_load_refuses_what_holds_no_export(tmp_path):
    with pytest.raises(errors.UserError, match='no exported model here'):
        api.load(tmp_path)
    random_export(experiment_config('toy2d_rf', 'runlocal'), tmp_path / 'teacher')
    with pytest.raises(errors.UserError, match='subdirectories teacher .*load one, e.g. .*teacher'):
        api.load(tmp_path)  # a pipeline's workdir names its stages
    with pytest.raises(errors.UserError, match='not a safetensors file'):
        api.load(tmp_path / 'teacher' / 'export' / 'meta.json')


def test_class_conditional_images(tmp_path):
    stage = experiment_config('fireflow_digits', 'runlocal').teacher_s0  # NCSN++ on 8x8 digits, label dropout
    model = api.load(_random_export(stage, kinds.from_config(stage), tmp_path / 'digits', shape=(8, 8, 1)))
    assert model.is_image and model.num_classes == 10
    x = model.sample(8, 'euler@2', labels=3, guidance=2.0, batch_size=8)
    assert x.shape == (8, 8, 8, 1) and np.isfinite(x).all()
    pixels = api.to_uint8(x)
    assert pixels.dtype == np.uint8 and np.array_equal(api.to_uint8(np.array([-1.0, 0.0, 1.0, 7.0])), [0, 128, 255, 255])
    labels = model.draw_labels(8, seed=0)
    assert labels.shape == (8,) and labels.min() >= 0 and labels.max() < 10
    for call, fragment in ((lambda: model.sample(4, labels=[1, 2]), 'expected a class id or 4 class ids in 0..9'),
                           (lambda: model.sample(4, labels=10), 'in 0..9'),
                           (lambda: model.invert(x), 'is class-conditional .*give the class of each row')):
        with pytest.raises(errors.UserError, match=fragment):
            call()


def test_run_and_config_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(errors.UserError, match="config argument 'runloca' is unknown"):
        api.config('experiments/toy2d_rf.py:runloca')
    with pytest.raises(errors.UserError, match="--config=experiments/nope.py: no experiment file 'experiments/nope.py'"):
        api.run('experiments/nope.py', tmp_path)
    with pytest.raises(errors.UserError, match='--workdir is required'):
        api.run('experiments/toy2d_rf.py:runlocal', '')
    config = api.config('experiments/toy2d_rf.py:runlocal')
    with pytest.raises(AttributeError, match='stepz'):
        config.train.stepz = 3  # locked, as the command line's config


def test_import_flowjax_is_light():
    code = 'import sys, flowjax; print(sorted(m for m in ("jax", "flax", "flowjax.api") if m in sys.modules))'
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]'
    assert callable(__import__('flowjax').load)
