"""Method 'compare': the table of methods (docs/methods.md, Method table), from an evaluate stage's report.

    config.compare.report = 'evaluate'                 # the stage whose report.json scores every model
    config.compare.stages = ('reflow_s0', ...)         # every stage named in compare.methods
    config.compare.methods = {'reflow': ('reflow_s0', 'reflow_s1'),
                              'slimflow': ('annealed_s0+distilled_s0', 'annealed_s1+distilled_s1')}

A method's entry per seed is the chain of stages that made its model, joined by '+', the last the model
the report scored. The stage writes report.json (the table, `comparison.method_table`), report.md and
quality_nfe.png (quality against NFE) in its workdir; as a pipeline's last stage its report is the
pipeline's report.md.
"""

import json
import math
from typing import Any

import jax
import ml_collections
from etils import epath
from ml_collections import config_dict

from flowjax import checkpoint, errors, evaluate, sharding
from flowjax.evaluation import comparison, report
from flowjax.methods import method

FIGURE = 'quality_nfe.png'


def defaults() -> ml_collections.ConfigDict:
    """`config.compare`: the report, the stages and their grouping into methods, the columns."""
    c = ml_collections.ConfigDict()
    c.report = config_dict.placeholder(str)  # the evaluate stage (or its workdir) whose report.json is read
    c.stages = ()  # every stage of compare.methods (stage names, or 'label=dir'): their steps and times are read
    c.methods = ml_collections.ConfigDict()  # name -> per seed, the '+'-joined stages of its model (the last scored)
    c.baseline = 'reflow'  # the method every other (with as many seeds) is paired against
    c.parts = ml_collections.ConfigDict()  # composition -> the methods it combines (each paired against it)
    c.nfes = (1, 2, 4)  # the quality columns: numbers of network evaluations
    c.default_samplers = ('euler@1', 'euler@2', 'euler@4')  # a method's samplers for the columns, in preference order
    c.samplers = ml_collections.ConfigDict()  # method -> its own preference (e.g. CAF: caf@1 (2 NFE), caf@3 (4 NFE))
    c.order = ()  # the rows' order, method names (the rest follow): by default the baseline first, then by name
    c.metric = config_dict.placeholder(str)  # the quality metric; None: the report's first (w2, fd_digits, fid)
    c.title = 'Every method on one teacher'
    return c


def _keys(field: str, value: Any, known: str = '') -> tuple[str, ...]:
    """A non-empty tuple of non-empty strings, else a one-line ConfigError naming `field`."""
    if not isinstance(value, (tuple, list)) or not value or not all(isinstance(v, str) and v for v in value):
        shown = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
        raise errors.ConfigError(f'{field}={shown!r}: expected a non-empty tuple of names{known}')
    return tuple(value)


def _labels(config: ml_collections.ConfigDict) -> dict[str, str]:
    """label -> directory of every compare.stages entry ('label=dir', a stage name or a directory)."""
    entries = config.compare.stages
    if not isinstance(entries, (tuple, list)) or not all(isinstance(e, str) and e for e in entries):
        raise errors.ConfigError(f'compare.stages={entries!r}: expected a tuple of stage names')
    return dict(evaluate.model_entry(e) for e in entries)


def chains(config: ml_collections.ConfigDict) -> dict[str, list[tuple[str, ...]]]:
    """compare.methods as {name: [the stage labels of each seed's model, the last scored]}, in the rows' order
    (compare.order, then the baseline, then by name)."""
    cfg = config.compare
    first = [*cfg.order, *([] if cfg.baseline in cfg.order else [cfg.baseline])]
    names = [*first, *sorted(set(cfg.methods) - set(first))]
    return {name: [tuple(entry.split('+')) for entry in cfg.methods[name]] for name in names}


def check(config: ml_collections.ConfigDict) -> None:
    """Static checks of `config.compare` (touches no files)."""
    cfg = config.compare
    if not isinstance(cfg.report, str) or not cfg.report:
        raise errors.ConfigError('compare.report: the evaluate stage (or a directory with its report.json) is required')
    labels = _labels(config)
    if not cfg.methods:
        raise errors.ConfigError("compare.methods: name at least one method (name -> per seed, its stages joined "
                                 "by '+')")
    for name, seeds in cfg.methods.items():
        for entry in _keys(f'compare.methods.{name}', seeds, " (per seed, the model's stages joined by '+')"):
            for stage in entry.split('+'):
                if stage not in labels:
                    raise errors.ConfigError(f'compare.methods.{name}: stage {stage!r} (of {entry!r}) is not in '
                                             f"compare.stages ({', '.join(labels) or 'none'})")
    methods = ', '.join(cfg.methods)
    if cfg.baseline not in cfg.methods:
        raise errors.ConfigError(f'compare.baseline={cfg.baseline!r}: not a method of compare.methods ({methods})')
    for name, of in cfg.parts.items():
        for part in _keys(f'compare.parts.{name}', of, f' of compare.methods ({methods})'):
            for method_name in (name, part):
                if method_name not in cfg.methods:
                    raise errors.ConfigError(f'compare.parts.{name}: {method_name!r} is not a method of '
                                             f'compare.methods ({methods})')
            if len(cfg.methods[name]) != len(cfg.methods[part]):
                raise errors.ConfigError(f'compare.parts.{name}: {name!r} and {part!r} have {len(cfg.methods[name])} '
                                         f'and {len(cfg.methods[part])} seeds; paired differences need as many in each')
    nfes = cfg.nfes
    if (not isinstance(nfes, (tuple, list)) or not nfes or len(set(nfes)) != len(nfes)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in nfes)):
        raise errors.ConfigError(f'compare.nfes={nfes!r}: expected a tuple of distinct integers >= 1')
    _keys('compare.default_samplers', cfg.default_samplers, ' (sampler keys, e.g. euler@1)')
    for name, keys in cfg.samplers.items():
        if name not in cfg.methods:
            raise errors.ConfigError(f'compare.samplers.{name}: not a method of compare.methods ({methods})')
        _keys(f'compare.samplers.{name}', keys, ' (sampler keys, e.g. caf@1)')
    for name in _keys('compare.order', cfg.order, f' of compare.methods ({methods})') if cfg.order else ():
        if name not in cfg.methods:
            raise errors.ConfigError(f'compare.order: {name!r} is not a method of compare.methods ({methods})')
    if cfg.metric is not None and (not isinstance(cfg.metric, str) or not cfg.metric):
        raise errors.ConfigError(f'compare.metric={cfg.metric!r}: expected a metric of the report (w2, fd_digits, fid) '
                                 'or None')


def _cost(path: str) -> comparison.Cost:
    """A stage's training steps (its export's meta.json) and the seconds of the run that finished it (stage.json)."""
    export, found = checkpoint.find_export(path)
    steps = json.loads((export / 'meta.json').read_text()).get('step') if found else None
    marker = epath.Path(path) / 'stage.json'
    seconds = json.loads(marker.read_text()).get('seconds') if marker.exists() else None
    return comparison.Cost(steps=steps, seconds=seconds if seconds is None or math.isfinite(seconds) else None)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Reads the report and the stages' costs, writes the table (report.json, report.md, quality_nfe.png)."""
    check(config)
    cfg = config.compare
    scores = report.read_report(cfg.report)
    if not scores:
        raise errors.UserError(f'compare.report: no report.json in {cfg.report} (expected the directory of an '
                               'evaluate stage that scored the models of compare.methods)')
    costs = {label: _cost(path) for label, path in _labels(config).items()}
    table = comparison.method_table(scores, chains(config), costs, nfes=tuple(cfg.nfes),
                                    samplers={k: tuple(v) for k, v in cfg.samplers.items()},
                                    default_samplers=tuple(cfg.default_samplers), baseline=cfg.baseline,
                                    parts={k: tuple(v) for k, v in cfg.parts.items()}, metric=cfg.metric)
    workdir = epath.Path(workdir)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        report._write_atomic(workdir / 'report.json', json.dumps(table, indent=2) + '\n')
        report._write_atomic(workdir / 'report.md', comparison.markdown(table, cfg.title))
        comparison.figure(workdir / FIGURE, table, cfg.title)
    sharding.barrier('flowjax-compare')
    return {'methods': len(table['methods']), 'metric': table['metric']}


# It reads only its own section (the report and stages it names are its pipeline references).
METHOD = method.Method(name='compare', run=run, check=check, section=defaults,
                       references=('compare.report', 'compare.stages'), reads=())
