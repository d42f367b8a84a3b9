"""Method `transfer` (docs/methods.md, Weight transfer): target + scale (tuned - base) of tiny toy
MLP exports, exactly; mismatched exports refused in one line; a pipeline stage naming stages."""

import json

import jax
import numpy as np
import pytest

from flowjax import checkpoint, configs, errors, pipeline, train
from flowjax.methods import table, transfer
from flowjax.models import kinds


def _config(features=(8, 8)):
    c = table.config('rf')
    c.model.features = features
    c.model.time_dim = 8
    c.train.steps = 3
    return c


def _export(path, seed: int, features=(8, 8)) -> dict:
    """An export of a random toy MLP (kind velocity); its params as numpy."""
    c = _config(features)
    kind = kinds.from_config(c)
    params = kind.init(jax.random.key(seed), (2,))
    checkpoint.export(path, params, train.export_meta(c, kind, (2,), c.train.steps + seed))
    return jax.tree.map(np.asarray, params)


def _stage(tmp_path, **fields):
    c = table.config('transfer')
    c.eval.samplers = ()
    c.transfer.update(base=str(tmp_path / 'base'), tuned=str(tmp_path / 'tuned'), target=str(tmp_path / 'target'))
    c.transfer.update(fields)
    return c


@pytest.fixture
def exports(tmp_path):
    return {name: _export(tmp_path / name, seed) for seed, name in enumerate(('base', 'tuned', 'target'))}


@pytest.mark.parametrize('scale', [1.0, 0.5])
def test_transfer_adds_the_scaled_change_exactly(tmp_path, exports, scale):
    config = _stage(tmp_path, scale=scale)
    assert transfer.run(config, str(tmp_path / 'out')) == {}
    params, meta = checkpoint.load_export(tmp_path / 'out')
    want = jax.tree.map(lambda t, a, b: t + np.float32(scale) * (a - b),
                        exports['target'], exports['tuned'], exports['base'])
    for got, expected in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
    assert meta['kind'] == 'velocity' and meta['step'] == 4  # the tuned model's kind, network and step
    assert meta['method'] == 'transfer' and meta['transfer']['scale'] == scale
    assert meta['transfer']['tuned'] == {'path': str(tmp_path / 'tuned'), 'method': 'rf', 'step': 4}

    # A rerun keeps the export; another scale into the same workdir is refused, nothing changed.
    before = (tmp_path / 'out' / 'export' / 'meta.json').read_text()
    transfer.run(config, str(tmp_path / 'out'))
    with pytest.raises(errors.UserError, match='holds a transfer of other exports'):
        transfer.run(_stage(tmp_path, scale=scale + 1), str(tmp_path / 'out'))
    assert (tmp_path / 'out' / 'export' / 'meta.json').read_text() == before


def test_transfer_refuses_bad_fields_and_mismatched_exports(tmp_path, exports):
    for field, value, message in (('base', None, 'transfer.base: an export directory'),
                                  ('tuned', '', 'transfer.tuned: an export directory'),
                                  ('scale', float('inf'), 'transfer.scale=inf: must be a finite number')):
        with pytest.raises(errors.ConfigError, match=message.replace('(', r'\(')):
            transfer.check(_stage(tmp_path, **{field: value}))
    with pytest.raises(errors.UserError, match='no exported model here'):
        transfer.run(_stage(tmp_path, target=str(tmp_path / 'nothing')), str(tmp_path / 'out'))

    _export(tmp_path / 'wider', 3, features=(8, 16))
    with pytest.raises(errors.ConfigError) as e:
        transfer.run(_stage(tmp_path, tuned=str(tmp_path / 'wider')), str(tmp_path / 'out'))
    assert "transfer.tuned: parameter ['params']['dense_1']['bias'] has shape (16,)" in str(e.value)
    assert '\n' not in str(e.value)
    _export(tmp_path / 'deeper', 4, features=(8, 8, 8))
    with pytest.raises(errors.ConfigError, match='transfer.target: parameter .* is only in transfer.target'):
        transfer.run(_stage(tmp_path, target=str(tmp_path / 'deeper')), str(tmp_path / 'out'))

    # Same names and shapes, another network: the target must be the base's kind and network.
    meta_path = tmp_path / 'target' / 'export' / 'meta.json'
    meta = json.loads(meta_path.read_text())
    meta['model']['name'] = 'mlp_other'
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(errors.ConfigError, match='transfer.target: .* fine-tune the target from the base'):
        transfer.run(_stage(tmp_path), str(tmp_path / 'out'))
    assert not checkpoint.is_exported(tmp_path / 'out')


def test_a_transfer_stage_resolves_stage_names(tmp_path, exports):
    stage = _stage(tmp_path, base='base', tuned='tuned', target='target')
    stage.eval.update(samplers=('euler@2',), num_samples=64, straightness_steps=4, trajectories=4)
    standins = {}
    for name in ('base', 'tuned', 'target'):
        standins[name] = _config()
        standins[name].checkpoint = str(tmp_path / name)
    config = configs.pipeline(**standins, plugged=stage)
    plan = pipeline.plan(config, str(tmp_path / 'run'))
    assert {f: plan.configs['plugged'].transfer[f] for f in transfer.FIELDS} == {
        f: str(tmp_path / f) for f in transfer.FIELDS}
    results = pipeline.run(config, str(tmp_path / 'run'))
    assert 'euler@2' in json.dumps(results['plugged']) and (tmp_path / 'run' / 'report.md').exists()
    params, meta = checkpoint.load_export(tmp_path / 'run' / 'plugged')
    assert meta['transfer']['base']['path'] == str(tmp_path / 'base')
    assert json.loads((tmp_path / 'run' / 'plugged' / pipeline.MARKER).read_text())['method'] == 'transfer'
    np.testing.assert_array_equal(jax.tree.leaves(params)[0], jax.tree.leaves(jax.tree.map(
        lambda t, a, b: t + (a - b), exports['target'], exports['tuned'], exports['base']))[0])
