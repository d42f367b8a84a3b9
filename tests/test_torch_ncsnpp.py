"""PyTorch NCSN++ teachers (flowjax.interop.torch_ncsnpp): the reference network's own checkpoints and outputs.

The fixtures (tests/fixtures/README.md) are checkpoints the reference code saved (score_sde_pytorch layout:
optimizer, model with DataParallel's `module.` keys, ema, step) of two random NCSN++ networks, and the
reference's outputs `model(x, 999 t)` for the EMA and the raw weights. No torch here.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_files
from conftest import experiment_config
from flowjax import checkpoint, errors, pipeline
from flowjax.interop import torch_ncsnpp, torch_pickle
from flowjax.methods import training
from flowjax.models import kinds

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
REFERENCE = np.load(FIXTURES / 'ncsnpp_rf_fixture.npz')
# fixture: (image size, the layout its shapes give)
CASES = {
    'ncsnpp_rf_8x8': (8, torch_ncsnpp.Layout(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), channels=1,
                                             conditional=True)),
    'ncsnpp_rf_16x16': (16, torch_ncsnpp.Layout(nf=4, ch_mult=(1, 2, 2), num_res_blocks=2, attn_levels=(1,),
                                                channels=3, conditional=True)),
}
TOLERANCE = 1e-4  # max abs difference from the reference's float32 outputs (they reach about 3 in size)


def _velocity(variables, meta, name):
    """The export's velocity (through its kind, as sampling calls it) at the fixture's (x, t), NCHW."""
    kind = kinds.from_meta(meta)
    x = jnp.asarray(REFERENCE[f'{name}/x'].transpose(0, 2, 3, 1))
    return np.asarray(kind.velocity(variables)(x, jnp.asarray(REFERENCE[f'{name}/t']))).transpose(0, 3, 1, 2)


@pytest.mark.parametrize('which', ['ema', 'model'])
@pytest.mark.parametrize('name', list(CASES))
def test_imported_velocity_is_the_reference_network(name, which):
    size, _ = CASES[name]
    variables, meta = torch_ncsnpp.convert(str(FIXTURES / f'{name}.pth'), which, {'data.image_size': size})
    out, ref = _velocity(variables, meta, name), REFERENCE[f'{name}/{which}']
    other = REFERENCE[f'{name}/{"model" if which == "ema" else "ema"}']
    assert np.abs(ref - other).max() > 0.5  # the two weight sets give different outputs: the choice is tested
    assert out.shape == ref.shape and np.abs(out - ref).max() < TOLERANCE
    assert meta['source']['weights'] == which and meta['source']['format'] == 'score_sde_pytorch'
    assert meta['sample_shape'] == [size, size, CASES[name][1].channels] and meta['step'] == 7


@pytest.mark.parametrize('name', list(CASES))
def test_layout_and_config_from_shapes(name):
    size, layout = CASES[name]
    ckpt = torch_ncsnpp.read_checkpoint(str(FIXTURES / f'{name}.pth'))
    assert all(k.startswith('module.') for k in ckpt['model'])  # DataParallel's keys, as the reference saves
    params = torch_ncsnpp.weights(ckpt, 'ema')
    assert 'sigmas' not in params and len(params) == len(ckpt['ema']['shadow_params']) == len(ckpt['model']) - 1
    assert torch_ncsnpp.infer_layout(params) == layout
    model, shape = torch_ncsnpp.model_config(layout, {'data.image_size': size, 'model.dropout': 0.0})
    assert model == {'name': 'ncsnpp', 'nf': layout.nf, 'ch_mult': list(layout.ch_mult),
                     'num_res_blocks': layout.num_res_blocks, 'attn_resolutions': [size // 2], 'dropout': 0.0}
    assert shape == [size, size, layout.channels]
    # a field the shapes tell, given alike, is accepted; attention named at a resolution the net lacks is ignored
    same = {'data.image_size': size, 'model.nf': layout.nf, 'model.ch_mult': layout.ch_mult,
            'model.attn_resolutions': (size // 2, 2 * size), 'model.fir': False}
    assert torch_ncsnpp.model_config(layout, same)[0]['attn_resolutions'] == [size // 2]


def test_reader_honours_strides_offsets_and_refuses_code(tmp_path):
    base = np.arange(30, dtype=np.float32)
    torch_files.save({'a': torch_files.View(base, (2, 3), (1, 4), 5), 'n': 3, 'b': [np.eye(2)]}, tmp_path / 'v.pth')
    got = torch_pickle.load(str(tmp_path / 'v.pth'), 'f')
    np.testing.assert_array_equal(got['a'], np.lib.stride_tricks.as_strided(base[5:], (2, 3), (4, 16)))
    assert got['n'] == 3 and got['b'][0].dtype == np.float64
    torch_files.save({'a': torch_files.View(base, (2, 3), (1, 20), 5)}, tmp_path / 'past.pth')
    with pytest.raises(errors.UserError, match=r'^f: .*past.pth is not a readable PyTorch file .*runs past its storage'):
        torch_pickle.load(str(tmp_path / 'past.pth'), 'f')
    torch_files.save({'x': torch_files.Global('os', 'system')}, tmp_path / 'code.pth')
    with pytest.raises(errors.UserError, match=r'unsupported object os.system'):
        torch_pickle.load(str(tmp_path / 'code.pth'), 'f')


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
    """The 8x8 fixture teacher imported by the command line (EMA weights, the default)."""
    out = tmp_path_factory.mktemp('imported') / 'rf_teacher'
    torch_ncsnpp.main(['--checkpoint', str(FIXTURES / 'ncsnpp_rf_8x8.pth'), '--out', str(out),
                       '--config', 'data.image_size=8', '--config', 'model.dropout=0.0'])
    return out


def test_command_line_export_loads_as_a_teacher(imported, tmp_path):
    model = training.load_model(str(imported), 'teacher.checkpoint')
    assert isinstance(model.kind, kinds.VelocityField) and model.meta['method'] == 'import'
    assert np.abs(_velocity(model.params, model.meta, 'ncsnpp_rf_8x8') - REFERENCE['ncsnpp_rf_8x8/ema']).max() < TOLERANCE
    # a student of the same network (its recipe lists more fields) starts from it as reflow does (reflow.init):
    # the same parameter tree as the network it trains
    student = experiment_config('digits_reflow').reflow
    student.model.update(skip_rescale=True, resblock_type='biggan')  # fields at their defaults, which meta omits
    init = training.load_model(str(imported), 'reflow.init', student).params
    fresh = jax.eval_shape(lambda key: kinds.from_config(student).init(key, (8, 8, 1)), jax.random.key(0))
    assert jax.tree.map(np.shape, init) == jax.tree.map(lambda a: a.shape, fresh)
    student.model.nf = 8
    with pytest.raises(errors.ConfigError, match=r'^reflow.init: the model exported in .* differs from model'):
        training.load_model(str(imported), 'reflow.init', student)
    torch_ncsnpp.main(['--checkpoint', str(FIXTURES / 'ncsnpp_rf_8x8.pth'), '--out', str(tmp_path / 'raw' / 'export'),
                       '--weights', 'model', '--config', 'data.image_size=8'])
    raw = json.loads((tmp_path / 'raw' / 'export' / 'meta.json').read_text())
    assert raw['source']['weights'] == 'model' and raw['model']['dropout'] == torch_ncsnpp.DEFAULT_DROPOUT
    params, _ = checkpoint.load_export(tmp_path / 'raw')
    assert np.abs(_velocity(params, raw, 'ncsnpp_rf_8x8') - REFERENCE['ncsnpp_rf_8x8/model']).max() < TOLERANCE


def test_slimflow_digits_on_the_imported_teacher(imported, tmp_path):
    """slimflow_digits:runlocal (generate, slimflow_reflow, slimflow_distill, evaluate) with the imported teacher as
    `teacher.checkpoint`."""
    config = experiment_config('slimflow_digits', 'runlocal')
    config.teacher.checkpoint = str(imported)
    config.evaluate.eval.samplers = ('euler@1',)
    pipeline.run(config, str(tmp_path))
    assert not (tmp_path / 'teacher').exists()
    report = json.loads((tmp_path / 'report.json').read_text())
    assert report['couplings']['pairs'] == 64
    assert report['teacher']['params'] > 3 * report['distilled']['params']
    for model in ('teacher', 'annealed', 'distilled'):
        assert report[model]['euler@1']['fd_digits'] > 0 and report[model]['euler@1']['nfe'] == 1
    assert (tmp_path / 'samples.png').stat().st_size > 0
