"""Method edit (docs/methods.md, Editing (method edit)): the edit against an analytic class-conditional flow with a
closed-form answer, the job end to end on 8x8 digits, and the refusals of its fields."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax import checkpoint, errors, train
from flowjax.flows import solvers
from flowjax.methods import edit, table
from flowjax.models import kinds

K, D, S = 3, 4, 0.5  # classes, dimensions, the per-class spread s
MEANS = np.array([[2.0, 0.0, -1.0, 0.5], [-1.5, 1.0, 0.0, 2.0], [0.0, -2.0, 1.5, -1.0]], np.float32)
NULL_MEAN = MEANS.mean(axis=0)  # the null label's class: N(mean of the means, s^2 I)


def _sigma(t):
    return jnp.sqrt((1 - t) ** 2 + (t * S) ** 2)


def _velocity(params, x, t, dropout_rng=None, label=None):
    """The exact rectified flow from N(0, I) to N(m_y, s^2 I): x_t = t m + sigma_t x0 with
    sigma_t^2 = (1 - t)^2 + t^2 s^2, so v = m + (sigma_t' / sigma_t) (x - t m)."""
    del dropout_rng
    m = params['means'][label]
    t = t[:, None]
    rate = (-(1 - t) + t * S ** 2) / _sigma(t) ** 2  # sigma_t' / sigma_t
    return m + rate * (x - t * m)


ANALYTIC = kinds.VelocityFunction(_velocity, num_classes=K, null_label=K)
PARAMS = {'means': jnp.asarray(np.concatenate([MEANS, NULL_MEAN[None]]))}


def _expected(x1, a, b, eps, guidance=1.0):
    """The flow map solved exactly: x_t - t m = (sigma_t / sigma_eps) (x_eps - eps m), inverted with m_a and
    regenerated with the guided mean m_w = m_null + w (m_b - m_null) (guidance is linear in m here):
    x' = m_w + (x1 - m_a) + eps (sigma_1 / sigma_eps) (m_a - m_w); at eps = 0, m_w + (x1 - m_a)."""
    m_a, m_w = MEANS[a], NULL_MEAN + guidance * (MEANS[b] - NULL_MEAN)
    ratio = float(_sigma(1.0) / _sigma(eps))
    return m_w + (x1 - m_a) + eps * ratio * (m_a - m_w)


@pytest.mark.parametrize('spec, eps, guidance, tol', [('midpoint@32', 0.0, 1.0, 2e-3), ('midpoint@32', 0.05, 1.0, 2e-3),
                                                      ('midpoint@32', 0.0, 2.0, 2e-3), ('euler@2', 0.0, 1.0, None)])
def test_edit_of_an_analytic_flow_is_its_closed_form(spec, eps, guidance, tol):
    rng = np.random.default_rng(0)
    a = rng.integers(0, K, 16)
    b = (a + 1 + rng.integers(0, K - 1, 16)) % K  # another class
    x1 = (MEANS[a] + S * rng.normal(size=(16, D))).astype(np.float32)
    sampler = solvers.parse_sampler(spec)
    out, n_in, n_out = edit.edit(ANALYTIC, PARAMS, jnp.asarray(x1), jnp.asarray(a), jnp.asarray(b), sampler,
                                 eps=eps, guidance=guidance)
    want = _expected(x1, a, b, eps, guidance)
    error = np.abs(np.asarray(out) - want).max()
    if tol is None:  # two Euler steps are far from it: the closed form is not met by any solve
        assert error > 0.05
    else:
        assert error < tol, error
    steps, per_step = sampler.steps, 2 if sampler.name == 'midpoint' else 1
    assert int(n_in) == steps * per_step and int(n_out) == steps * per_step * (1 if guidance == 1 else 2)
    # editing to the source class itself is a reconstruction: x1 back (guidance 1)
    if tol is not None and guidance == 1.0:
        back, _, _ = edit.edit(ANALYTIC, PARAMS, jnp.asarray(x1), jnp.asarray(a), jnp.asarray(a), sampler, eps=eps)
        assert np.abs(np.asarray(back) - x1).max() < tol


def test_inversion_is_unguided_even_for_a_guided_kind():
    """A kind already guided at w still inverts at guidance 1 and regenerates at the scale asked for."""
    x1 = MEANS[[0, 1]] + 0.1
    sampler = solvers.parse_sampler('midpoint@32')
    guided = kinds.guided(ANALYTIC, 3.0, 'test')
    out, n_in, n_out = edit.edit(guided, PARAMS, jnp.asarray(x1), jnp.array([0, 1]), jnp.array([2, 2]), sampler,
                                 eps=0.0, guidance=1.0)
    assert np.abs(np.asarray(out) - _expected(x1, np.array([0, 1]), np.array([2, 2]), 0.0)).max() < 2e-3
    assert (int(n_in), int(n_out)) == (64, 64)


def test_guidance_without_a_null_label_is_refused_in_one_line():
    no_null = kinds.VelocityFunction(_velocity, num_classes=K)
    with pytest.raises(errors.UserError) as e:
        edit.edit(no_null, PARAMS, jnp.zeros((2, D)), jnp.array([0, 1]), jnp.array([1, 0]),
                  solvers.parse_sampler('euler@2'), eps=0.0, guidance=2.0)
    assert '\n' not in str(e.value) and 'edit.guidance=2' in str(e.value) and 'label_dropout' in str(e.value)


def test_target_columns():
    labels = np.array([0, 2, 9])
    assert [c.tolist() for c in edit.target_columns('next', labels, 10)] == [[1, 3, 0]]
    assert [c.tolist() for c in edit.target_columns((4, 0), labels, 10)] == [[4, 4, 4], [0, 0, 0]]
    columns = edit.target_columns('all', labels, 10)
    assert len(columns) == 10 and all(c.tolist() == [k] * 3 for k, c in enumerate(columns))
    assert edit.column_titles('all', 3) == ['to 0', 'to 1', 'to 2'] and edit.column_titles('next', 3) == ['to y+1']


# ------------------------------------------------------------------------------------------------ the job


MODEL = {'name': 'ncsnpp', 'nf': 8, 'ch_mult': (1,), 'num_res_blocks': 1, 'attn_resolutions': (), 'dropout': 0.0,
         'num_classes': 10}


def _config(model_path: str, **fields):
    c = table.config('edit')
    c.data.kind = 'image'
    c.data.image = {'name': 'digits'}
    c.eval.batch_size = 16
    c.edit.model = model_path
    c.edit.samplers = ('euler@2',)
    c.edit.count = 10
    c.edit.grid = 4
    c.edit.update(fields)
    return c


def _export(path, params=None, **model):
    """An export of a class-conditional NCSN++ on digits: random-init `params`, or zeros of the network's
    shapes when None (for a model only its meta is read of)."""
    c = table.config('rf')
    c.data.kind = 'image'
    c.data.image = {'name': 'digits'}
    c.model = {**MODEL, **model}
    kind = kinds.from_config(c)
    if params is None:
        shapes = jax.eval_shape(lambda key: kind.init(key, (8, 8, 1)), jax.random.key(0))
        params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    checkpoint.export(path, params, train.export_meta(c, kind, (8, 8, 1), 0))
    return str(path)


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
    """'guided' (label_dropout 0.1: a null label), 'plain' (the same weights, no label dropout: no null label)
    and 'unconditional' (num_classes 0)."""
    root = tmp_path_factory.mktemp('edit_models')
    kind = kinds.VelocityField.from_model_config({**MODEL, 'label_dropout': 0.1})
    params = jax.tree.map(np.asarray, jax.jit(lambda key: kind.init(key, (8, 8, 1)))(jax.random.key(0)))
    return {'guided': _export(root / 'guided', params, label_dropout=0.1), 'plain': _export(root / 'plain', params),
            'unconditional': _export(root / 'unconditional', num_classes=0)}


def test_edit_job_on_digits(exports, tmp_path, monkeypatch):
    panels = []
    monkeypatch.setattr(edit, 'panel', lambda s, e, f=edit.panel: panels.append(f(s, e)) or panels[-1])
    result = edit.run(_config(exports['guided']), str(tmp_path))
    assert {p.name for p in tmp_path.iterdir()} >= {'edit.json', 'edit.md', 'edit.png'}
    assert json.loads((tmp_path / 'edit.json').read_text()) == result
    assert (result['count'], result['edits'], result['reconstructions'], result['classifier']) == (10, 90, 10, True)
    unguided, guided = result['results']['euler@2']['1'], result['results']['euler@2']['2']
    assert (unguided['nfe'], unguided['invert_nfe'], unguided['regenerate_nfe']) == (4, 2, 2)
    assert (guided['nfe'], guided['invert_nfe'], guided['regenerate_nfe']) == (6, 2, 4)  # regeneration doubled
    for cell in (unguided, guided):
        assert 0 <= cell['accuracy'] <= 1 and 0 <= cell['reconstruction_accuracy'] <= 1
        assert np.isfinite(cell['psnr']) and cell['rmse'] > 0 and 'lpips' not in cell
    assert 0.9 <= result['source_accuracy'] <= 1  # the shipped classifier on real digits
    # one panel per (sampler, guidance): rows the grid's 4 sources, columns the source and the 10 classes
    assert len(panels) == 2 and all(p.shape == (4 * 9 - 1, 11 * 9 - 1, 1) for p in panels)
    from flowjax.evaluation import images
    from flowjax.methods.edit import _suite

    sources, labels = _suite(_config(exports['guided']), tmp_path, 10, edit.check(_config(exports['guided']))
                             ).held_out(10)
    assert np.array_equal(panels[0][:8, :8], images.grid(sources[:1]))  # top left: the first source
    md = (tmp_path / 'edit.md').read_text()
    assert '| euler@2 | 2 |' in md and 'accuracy' in md and 'uint8' in md
    from PIL import Image

    assert Image.open(tmp_path / 'edit.png').size[0] > 200

    # the same model, one target column (cached jits, no recompile): 'next' has no reconstructions
    again = edit.run(_config(exports['guided'], targets='next', guidance=(1.0,)), str(tmp_path / 'next'))
    cell = again['results']['euler@2']['1']
    assert (again['edits'], again['reconstructions'], cell['reconstruction_accuracy']) == (10, 0, None)
    targeted = edit.run(_config(exports['guided'], targets=(int(labels[0]),), guidance=(1.0,)), str(tmp_path / 't'))
    assert targeted['reconstructions'] == int(np.sum(labels == labels[0]))


def test_edit_job_refusals(exports, tmp_path):
    with pytest.raises(errors.UserError) as e:
        edit.run(_config(exports['plain'], guidance=(1.0, 2.0)), str(tmp_path))
    assert '\n' not in str(e.value) and 'edit.guidance=2' in str(e.value) and 'label_dropout > 0' in str(e.value)
    assert not (tmp_path / 'edit.json').exists()
    with pytest.raises(errors.UserError, match='not class-conditional'):
        edit.run(_config(exports['unconditional']), str(tmp_path))
    with pytest.raises(errors.UserError, match=r'edit.targets=\(12,\).*num_classes=10'):
        edit.run(_config(exports['plain'], guidance=(1.0,), targets=(12,)), str(tmp_path))
    with pytest.raises(errors.UserError, match="edit.samplers: 'caf@2' does not apply"):
        edit.run(_config(exports['plain'], guidance=(1.0,), samplers=('caf@2',)), str(tmp_path))


@pytest.mark.parametrize('field, value, fragment', [
    ('model', None, 'edit.model: an export directory'),
    ('model', '', 'edit.model: an export directory'),
    ('samplers', (), 'edit.samplers=()'),
    ('samplers', ('euler@2', 'euler@2'), 'distinct sampler specs'),
    ('samplers', ('eulr@2',), "edit.samplers: sampler 'eulr@2': unknown solver 'eulr'"),
    ('guidance', (), 'edit.guidance=()'),
    ('guidance', (-1.0,), 'edit.guidance=-1.0'),
    ('guidance', (1.0, 1.0), 'listed twice'),
    ('count', 0, 'edit.count=0'),
    ('count', 5000, 'edit.count=5000: more than the 1797 images'),
    ('grid', 0, 'edit.grid=0'),
    ('targets', 'some', "edit.targets='some'"),
    ('targets', (), 'edit.targets=()'),
    ('targets', (1, 1), 'distinct class ids'),
    ('targets', (-1,), 'class ids >= 0'),
])
def test_bad_fields(field, value, fragment):
    c = _config('somewhere')
    c.edit[field] = value
    with pytest.raises(errors.ConfigError) as e:
        edit.check(c)
    assert '\n' not in str(e.value) and fragment in str(e.value), str(e.value)


def test_bad_data_and_eval():
    c = _config('somewhere')
    c.data.kind = 'toy2d'
    with pytest.raises(errors.ConfigError, match="data.kind='toy2d'.*data.kind='image'"):
        edit.check(c)
    c = _config('somewhere')
    c.eval.batch_size = 12
    with pytest.raises(errors.ConfigError, match='eval.batch_size=12'):
        edit.check(c)
    c = _config('somewhere')
    c.eval.lpips = True  # 8x8 digits need lpips.resize >= 16
    with pytest.raises(errors.ConfigError, match='16x16'):
        edit.check(c)


def test_accuracy_only_on_digits():
    c = _config('somewhere')
    assert edit.is_digits(c, (8, 8, 1)) and not edit.is_digits(c, (8, 8, 3))
    c.data.image = {'name': 'npz', 'path': 'x.npz'}
    assert not edit.is_digits(c, (8, 8, 1))
    md = edit.markdown({'results': {'euler@2': {'1': {'psnr': 20.0, 'rmse': 3.0, 'nfe': 4}}}, 'targets': 'next',
                        'count': 2, 'num_classes': 10, 'edits': 2, 'reconstructions': 0, 'classifier': False})
    assert 'accuracy is left out' in md and '| sampler | guidance | psnr | rmse | nfe |' in md
