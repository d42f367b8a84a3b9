"""Every method on one teacher: the table (flowjax/evaluation/comparison.py, method compare) and the
experiment all_methods_toy2d, whose runlocal variant runs whole (all_methods_digits: its own file, so
that the two long runs can go to two test workers)."""

import json
import math
import re

import pytest

from conftest import experiment_config
from flowjax import errors, pipeline
from flowjax.evaluation import comparison
from flowjax.methods import compare, table

METHOD_ROWS = ('rf_teacher', 'reflow', 'distill', 'slimflow', 'rfpp', 'simple_reflow', 'caf', 'perflow',
               'slimflow_u_norm', 'caf_u')


def _report():
    """Two seeds of 2-RF (euler@n costs n), CAF (caf@N costs N + 1) and a composition of both."""

    def cells(base, nfes):
        return {key: {'w2': base + i, 'nfe': n, 'preservation_mse': base / 10, 'preservation_nfe': n}
                for i, (key, n) in enumerate(nfes.items())}

    euler = {'euler@1': 1, 'euler@2': 2, 'euler@4': 4}
    caf = {'euler@1': 2, 'caf@1': 2, 'caf@3': 4}
    return {
        'r0': {'params': 10, **cells(1.0, euler), 'straightness': 0.5},
        'r1': {'params': 10, **cells(2.0, euler), 'straightness': 0.7},
        'c0': {'params': 20, **cells(0.5, caf), 'straightness': 0.1},
        'c1': {'params': 20, **cells(1.0, caf), 'straightness': 0.2},
        'u0': {'params': 20, **cells(0.25, caf), 'straightness': 0.1},
        'u1': {'params': 20, **cells(0.75, caf), 'straightness': 0.2},
        'couplings': {'pairs': 4},
    }


def _table(**kw):
    methods = {'reflow': [('a0', 'r0'), ('a1', 'r1')], 'caf': [('c0',), ('c1',)], 'caf_u': [('u0',), ('u1',)]}
    costs = {'a0': comparison.Cost(5, 1.0), 'a1': comparison.Cost(5, 2.0), 'r0': comparison.Cost(10, 3.0),
             'r1': comparison.Cost(10, 4.0), 'c0': comparison.Cost(20, 6.0), 'c1': comparison.Cost(20, None),
             'u0': comparison.Cost(20, 1.0), 'u1': comparison.Cost(20, 1.0)}
    args = dict(nfes=(1, 2, 4), samplers={'caf': ('caf@1', 'caf@3'), 'caf_u': ('caf@1', 'caf@3')},
                default_samplers=('euler@1', 'euler@2', 'euler@4'), baseline='reflow', parts={'caf_u': ('caf',)})
    return comparison.method_table(_report(), methods, costs, **{**args, **kw})


def test_table_matches_nfe_sums_costs_and_pairs_seeds():
    t = _table()
    assert (t['metric'], t['score'], t['baseline']) == ('w2', 'mse', 'reflow')
    reflow, caf = t['methods']['reflow'], t['methods']['caf']
    assert reflow['samplers'] == {1: 'euler@1', 2: 'euler@2', 4: 'euler@4'}
    assert caf['samplers'] == {1: None, 2: 'caf@1', 4: 'caf@3'}  # caf@1 costs 2 NFE; nothing costs 1
    assert caf['quality'][1] is None and caf['quality'][2]['mean'] == pytest.approx(1.75)  # (0.5+1 + 1+1) / 2
    assert reflow['quality'][4]['mean'] == pytest.approx(3.5) and reflow['quality'][4]['std'] == pytest.approx(
        math.sqrt(0.5))
    # steps and seconds: the sum over each seed's chain; a seed with an unknown time is left out
    assert reflow['steps']['mean'] == 15 and reflow['seconds']['mean'] == pytest.approx(5.0)
    assert caf['seconds']['n'] == 1 and caf['seconds']['failed'] == 1 and caf['params'] == 20
    diff = t['differences']['caf - reflow']
    assert diff['pairs'] == [['c0', 'r0'], ['c1', 'r1']]
    # NFE 2: caf's caf@1 (1.5, 2.0) against 2-RF's euler@2 (2.0, 3.0)
    assert diff['quality'][2]['mean'] == pytest.approx(-0.75) and diff['quality'][1] is None
    assert diff['quality'][2]['std'] == pytest.approx(math.sqrt(0.125))
    assert diff['straightness']['mean'] == pytest.approx(-0.45)
    assert diff['preservation'][4]['mean'] == pytest.approx((0.05 - 0.1 + 0.1 - 0.2) / 2)
    assert set(t['differences']) == {'caf - reflow', 'caf_u - reflow', 'caf_u - caf'}
    assert t['differences']['caf_u - caf']['quality'][4]['mean'] == pytest.approx(-0.25)


def test_table_markdown_and_figure(tmp_path):
    t = _table()
    md = comparison.markdown(t, 'Every method')
    assert md.startswith('# Every method')
    for heading in ('## Methods', '## Fidelity', '## Paired differences', '## Samplers'):
        assert heading in md
    assert '| caf | - | caf@1 | caf@3 |' in md
    assert '| caf - reflow | 2 | - | -0.75 ± 0.35 (t -3) |' in md
    comparison.figure(tmp_path / 'q.png', t, 'Every method')
    assert (tmp_path / 'q.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    json.dumps(t)  # report.json


def test_figure_puts_quality_on_a_log_axis_only_when_it_spans_widely():
    assert comparison.log_quality([444.0, 11.2, 7.1])  # a teacher at 1 NFE far above its students
    assert not comparison.log_quality([0.2, 0.19, 1.93])  # within LOG_SPAN
    assert not comparison.log_quality([-1.0, 50.0]) and not comparison.log_quality([0.0, 5.0])
    assert not comparison.log_quality([])


def test_table_refuses_a_model_missing_from_the_report():
    with pytest.raises(errors.UserError, match=r"compare.methods.caf: model 'c9' is not in the evaluation report"):
        comparison.method_table(_report(), {'reflow': [('r0',)], 'caf': [('c9',)]},
                                {'r0': comparison.Cost(1, 1.0), 'c9': comparison.Cost(1, 1.0)}, nfes=(1,),
                                samplers={}, default_samplers=('euler@1',), baseline='reflow', parts={})


def test_table_refuses_a_metric_the_report_lacks():
    with pytest.raises(errors.UserError, match=r"compare.metric='fid': no model of the evaluation report has it "
                                               r"\(its scores: preservation_mse, w2\)"):
        _table(metric='fid')


def test_compare_run_refuses_a_report_directory_without_report_json(tmp_path):
    c = _compare_config(report=str(tmp_path), stages=(f'a0={tmp_path}', f'r0={tmp_path}', f'c0={tmp_path}'))
    with pytest.raises(errors.UserError, match='compare.report: no report.json in'):
        compare.run(c, str(tmp_path / 'out'))
    assert not (tmp_path / 'out').exists()


def _compare_config(**fields):
    c = table.config('compare')
    c.compare.update(report='evaluate', stages=('a0', 'r0', 'c0'), baseline='reflow')
    c.compare.methods = {'reflow': ('a0+r0',), 'caf': ('c0',)}
    for key, value in fields.items():
        c.compare[key] = value
    return c


@pytest.mark.parametrize('fields, message', [
    ({'report': None}, 'compare.report: the evaluate stage'),
    ({'methods': {}}, 'compare.methods: name at least one method'),
    ({'methods': {'reflow': ('a0+r9',)}}, "compare.methods.reflow: stage 'r9' (of 'a0+r9') is not in compare.stages"),
    ({'methods': {'reflow': ()}}, 'compare.methods.reflow=(): expected a non-empty tuple'),
    ({'baseline': 'rf'}, "compare.baseline='rf': not a method of compare.methods"),
    ({'parts': {'caf': ('slim',)}}, "compare.parts.caf: 'slim' is not a method"),
    ({'nfes': (1, 1)}, 'compare.nfes=(1, 1): expected a tuple of distinct integers >= 1'),
    ({'nfes': (0,)}, 'compare.nfes=(0,): expected'),
    ({'samplers': {'cafx': ('caf@1',)}}, 'compare.samplers.cafx: not a method'),
    ({'order': ('reflow', 'x')}, "compare.order: 'x' is not a method"),
])
def test_compare_check_refuses(fields, message):
    with pytest.raises(errors.ConfigError, match=re.escape(message)):
        compare.check(_compare_config(**fields))


def test_compare_rows_follow_order():
    c = _compare_config(order=('caf',))
    assert list(compare.chains(c)) == ['caf', 'reflow']
    assert list(compare.chains(_compare_config())) == ['reflow', 'caf']  # the baseline first


def same_budget(config):
    """Every one-stage student trains the recipe's 2-RF steps; the distillations the recipe's distillation steps."""
    steps = config.reflow_s0.train.steps
    for name in ('reflow', 'rfpp', 'simple_reflow', 'caf', 'caf_u', 'perflow', 'slimflow_annealed',
                 'slimflow_u_norm_annealed'):
        assert config[f'{name}_s0'].train.steps == steps, name
    assert config.distill_s0.train.steps == config.slimflow_s0.train.steps == config.slimflow_u_norm_s0.train.steps
    composed = config.slimflow_u_norm_annealed_s0.flow
    assert composed.time == 'u_shaped' and composed.normalize
    assert config.caf_u_s0.flow.time == 'u_shaped' and config.caf_s0.flow.time == 'grid'
    assert config.simple_reflow_s0.reflow.mix_couplings == 'forward_pairs'


def check_run(workdir, seeds):
    t = json.loads((workdir / 'report.json').read_text())
    assert list(t['methods']) == list(METHOD_ROWS)
    paired = METHOD_ROWS[2:] if seeds > 1 else (METHOD_ROWS[0], *METHOD_ROWS[2:])  # one seed: the teacher too
    assert set(t['differences']) == {f'{m} - reflow' for m in paired} | {
        'slimflow_u_norm - slimflow', 'slimflow_u_norm - rfpp', 'slimflow_u_norm - simple_reflow',
        'caf_u - caf', 'caf_u - rfpp'}
    for name, row in t['methods'].items():
        assert len(row['models']) == (1 if name == 'rf_teacher' else seeds) and row['params'] > 0
        if name != 'rf_teacher':
            assert row['steps']['mean'] >= 1 and row['seconds']['mean'] > 0, name
    assert t['methods']['caf']['samplers'] == {'1': None, '4': 'caf@3'}
    assert t['methods']['perflow']['samplers'] == {'1': None, '4': 'euler@4'}
    assert t['methods']['slimflow']['params'] < t['methods']['reflow']['params']
    assert t['methods']['distill']['steps']['mean'] == 2 * t['methods']['reflow']['steps']['mean']  # runlocal budgets
    d = t['differences']['rfpp - reflow']['quality']['1']
    assert d['n'] == seeds and math.isfinite(d['mean']) and (seeds == 1 or math.isfinite(d['t']))
    assert (workdir / 'report.md').read_text().startswith('# Every method on one teacher')
    assert (workdir / 'quality_nfe.png').exists()
    return t


def test_all_methods_toy2d_runlocal(tmp_path):
    full = experiment_config('all_methods_toy2d')
    assert [full[f'{m}_s2'].seed for m in ('reflow', 'caf', 'slimflow')] == [2, 2, 2]
    same_budget(full)
    assert tuple(full.evaluate.eval.samplers) == ('euler@1', 'euler@2', 'euler@4', 'caf@1', 'caf@3')
    config = experiment_config('all_methods_toy2d', 'runlocal')
    same_budget(config)
    pipeline.run(config, str(tmp_path / 'run'))
    check_run(tmp_path / 'run', seeds=2)
    before = (tmp_path / 'run' / 'reflow_s0' / 'stage.json').read_text()
    pipeline.run(config, str(tmp_path / 'run'))  # a rerun reuses every finished stage
    assert (tmp_path / 'run' / 'reflow_s0' / 'stage.json').read_text() == before
