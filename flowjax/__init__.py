"""flowjax: fast flow models in JAX/Flax (README.md).

The Python entry points (flowjax/api.py), imported on first use so that `import flowjax` stays light:

    flowjax.load(path)              a Model (an export, its workdir, or a .safetensors file): .kind, .meta, .params,
                                    .sample(n, sampler), .sample_from(x0), .invert(x), .reconstruct(x), .velocity(x, t),
                                    .save_safetensors(path)
    flowjax.config('exp.py:arg')    an experiment's config, to edit before running it
    flowjax.run(config, workdir)    runs it as `python -m flowjax.main` does; the report (dict) when there is one
    flowjax.to_uint8(images)        [-1, 1] images as uint8 pixels
"""

_API = ('Model', 'load', 'config', 'run', 'to_uint8')


def __getattr__(name: str):
    if name in _API:
        from flowjax import api

        return getattr(api, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
