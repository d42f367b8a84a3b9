"""Method 'evaluate': compares exported models on the same held-out sets (flowjax.evaluation does the work).

Also the evaluation entry points the training methods call: `evaluate(config, workdir, models)`
and `check_data(config)`.
"""

from typing import Any

import ml_collections
from etils import epath

from flowjax import checkpoint, errors
from flowjax.evaluation import fidelity, job, report
from flowjax.methods import method
from flowjax.models import kinds

evaluate = job.evaluate
check_data = job.check_data
parse_samplers = job.parse_samplers


def model_entry(entry: str) -> tuple[str, str]:
    """(label, path) of an `eval.models` entry: 'label=path', or a path labelled by its last component."""
    label, sep, path = ('', '', entry) if epath.Path(entry).exists() else entry.partition('=')
    return (label, path) if sep else (epath.Path(entry).name, entry)


def check(config: ml_collections.ConfigDict) -> None:
    """Static checks of the `evaluate` method's config."""
    check_data(config)
    if not config.eval.models:
        raise errors.ConfigError("eval.models: name at least one exported model ('label=path' or a stage)")
    fidelity.check_store(config)
    labels = [model_entry(m)[0] for m in config.eval.models]
    known = ', '.join(labels)
    for group, members in (config.eval.get('groups') or {}).items():
        field = f'eval.groups.{group}'
        if (not isinstance(members, (tuple, list)) or not members
                or not all(isinstance(m, str) for m in members)):
            value = members.to_dict() if isinstance(members, ml_collections.ConfigDict) else members
            raise errors.ConfigError(f'{field}={value!r}: expected a non-empty tuple of model labels ({known})')
        for label in members:
            if label not in labels:
                raise errors.ConfigError(f'{field}: {label!r} is not a model of eval.models ({known})')
            if members.count(label) > 1:
                raise errors.ConfigError(f'{field}: {label!r} is listed twice')
    groups = config.eval.get('groups') or {}
    for name, pair in (config.eval.get('differences') or {}).items():
        field = f'eval.differences.{name}'
        if not isinstance(pair, (tuple, list)) or len(pair) < 2 or not all(isinstance(g, str) for g in pair):
            raise errors.ConfigError(f"{field}={pair!r}: expected (group_a, group_b[, 'key_a=key_b', ...]), two groups "
                                     'of eval.groups (or a group and one model of eval.models) and optional sampler '
                                     'column pairs')
        samplers = [s.key for s in job.parse_samplers(config)]
        for column in pair[2:]:
            keys = column.split('=')
            if len(keys) != 2 or not all(k in samplers for k in keys):
                raise errors.ConfigError(f"{field}: column pair {column!r}: expected 'key_a=key_b' with both keys "
                                         f"samplers of eval.samplers ({', '.join(samplers)})")
        if pair[0] not in groups:
            raise errors.ConfigError(f"{field}: {pair[0]!r} is not a group of eval.groups "
                                     f"({', '.join(groups) or 'none'})")
        if pair[1] not in groups and pair[1] not in labels:
            raise errors.ConfigError(f"{field}: {pair[1]!r} is neither a group of eval.groups "
                                     f"({', '.join(groups) or 'none'}) nor a model of eval.models ({known})")
        if pair[1] in groups and len(groups[pair[0]]) != len(groups[pair[1]]):
            raise errors.ConfigError(f'{field}: groups {pair[0]!r} and {pair[1]!r} have {len(groups[pair[0]])} and '
                                     f'{len(groups[pair[1]])} models; paired differences need as many in each')


def _load(path: str) -> kinds.Model:
    """The model (kind, params, meta) of the export at `path` (an `eval.models` entry)."""
    if not path:
        raise errors.ConfigError('eval.models: an export directory (or pipeline stage name) is required')
    params, meta = checkpoint.load_export(path)
    return kinds.Model(kinds.from_meta(meta, 'eval.models'), params, meta)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Method 'evaluate': compares exported models (`eval.models`) on the same held-out sets.

    Each entry is an export path (or a pipeline stage name) or 'label=path'; the label
    defaults to the directory name. With `eval.couplings`, the coupling pass's pair count and
    mean NFE are reported too (and with `eval.preservation`, how well each model keeps its first
    pairs, `fidelity`); with `eval.groups`, each group's mean / std / min / max
    (`report.group_statistics`); with `eval.differences`, the paired differences of two groups
    (`report.paired_differences`). With several processes each samples, embeds and scores its share of
    every image batch (docs/methods.md, Metrics); all return the same result and process 0 writes it.
    """
    check(config)
    loaded = {}
    for entry in config.eval.models:
        label, path = model_entry(entry)
        loaded[label] = _load(path)
    merged = evaluate(config, epath.Path(workdir), loaded)
    groups = config.eval.get('groups') or {}
    differences = config.eval.get('differences') or {}
    stale = ('groups' in merged and not groups) or ('differences' in merged and not differences)  # an earlier run's
    merged.pop('groups', None)
    merged.pop('differences', None)
    if config.eval.couplings:
        from flowjax.data import couplings

        manifest = couplings.open_store(config.eval.couplings).manifest
        merged['couplings'] = {'pairs': manifest['num_pairs'], 'mean_nfe': manifest['mean_nfe'],
                               'sampler': manifest['sampler'], 'direction': manifest['direction']}
    if groups:
        merged['groups'] = report.group_statistics(merged, groups)
    if differences:
        merged['differences'] = report.paired_differences(merged, groups, differences)
    if config.eval.couplings or groups or stale:
        report.write_report(workdir, merged)
    return merged


# Evaluation reads the data, the flow's t_eps and its own `eval` section (eval.models and
# eval.couplings name earlier stages), not the model or training sections; `lpips` with eval.lpips.
METHOD = method.Method(name='evaluate', run=run, check=check, references=('eval.models', 'eval.couplings'),
                       reads=('data', 'flow', 'eval'), lpips=method.eval_uses_lpips)
