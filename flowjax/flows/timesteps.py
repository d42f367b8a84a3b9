"""Distributions of the training time t (t = 0 noise, t = 1 data).

Each sampler is `fn(rng, n, **options) -> (n,) float32`. Papers that write the noise level
s = 1 - t are translated here, at the edge:

    uniform       t ~ U[eps, 1]                                   (rectified flow)
    u_shaped      p(t) = a cosh(a (t - 1/2)) / (2 sinh(a / 2))    (docs/methods.md, rfpp)
    exp10         p(t_noise) = ln(10) 10^t_noise / 9, t = 1 - t_noise, into [eps, 1]
                                                                  (docs/methods.md, Simple ReFlow)
    logit_normal  t = sigmoid(mean + std z), z ~ N(0, 1), into [eps, 1]
    grid          t = k / points, k uniform in {0, ..., points}   (CAF's discrete times)
"""

import jax
import jax.numpy as jnp
import numpy as np

U_SHAPED_MARGIN = 1e-5  # rfpp rescales t into [1e-5, 1 - 1e-5]


def uniform(rng: jax.Array, n: int, *, eps: float = 1e-3) -> jax.Array:
    """t ~ U[eps, 1], the rectified-flow default (eps keeps t away from pure noise)."""
    return jax.random.uniform(rng, (n,), jnp.float32, minval=eps, maxval=1.0)


def _into_range(t: jax.Array, eps: float) -> jax.Array:
    """The affine map [0, 1] -> [eps, 1], t -> eps + (1 - eps) t (uniform's range)."""
    return eps + (1.0 - eps) * t


def _truncated_exponential(rng: jax.Array, n: int, a: float) -> jax.Array:
    """u on [0, 1] with density a e^{a u} / (e^a - 1), by inverse CDF: u = log1p(v (e^a - 1)) / a.

    Computed as the equal 1 + log1p((1 - v) expm1(-a)) / a, v ~ U[0, 1), which neither overflows
    for large a nor loses precision for small a; clipped to [0, 1] against rounding.
    """
    v = jax.random.uniform(rng, (n,), jnp.float32)
    u = 1.0 + jnp.log1p((1.0 - v) * jnp.expm1(-jnp.float32(a))) / a
    return jnp.clip(u, 0.0, 1.0)


def u_shaped(rng: jax.Array, n: int, *, a: float = 4.0) -> jax.Array:
    """rfpp's U-shaped density p(t) = a cosh(a (t - 1/2)) / (2 sinh(a / 2)) on [0, 1].

    u ~ a e^{a u} / (e^a - 1) (`_truncated_exponential`), then t = u or 1 - u with probability
    1/2 each (rfpp's code concatenates [u, 1 - u], shuffles and keeps n: the same distribution),
    then RESCALED (not clipped): t <- t (1 - 2e-5) + 1e-5. The density is symmetric about 1/2, so
    rfpp's s = 1 - t convention gives the same distribution of t. a = 4 makes the endpoints about
    3.8x as likely as the middle. docs/methods.md, rfpp.
    """
    k_u, k_flip = jax.random.split(rng)
    u = _truncated_exponential(k_u, n, a)
    t = jnp.where(jax.random.bernoulli(k_flip, 0.5, (n,)), u, 1.0 - u)
    return (t * (1.0 - 2.0 * U_SHAPED_MARGIN) + U_SHAPED_MARGIN).astype(jnp.float32)


def exp10(rng: jax.Array, n: int, *, eps: float = 1e-3) -> jax.Array:
    """Simple ReFlow's time density p(t_noise) = ln(10) 10^{t_noise} / 9 on [0, 1].

    t_noise = log10(1 + 9 u), u ~ U[0, 1) (inverse CDF). The paper does not confirm which end
    of its time axis is noise; this is the reading where t_noise = 1 is noise, so the mass is
    near noise: flowjax t = 1 - t_noise, mapped into uniform's range as
    t = eps + (1 - eps)(1 - t_noise), density proportional to 10^{-t} on [eps, 1].
    1 - t_noise is computed as the equal -log1p(0.9 (u - 1)) / ln 10, which keeps its relative
    precision near noise (u -> 1), where the mass is. docs/methods.md, Simple ReFlow.
    """
    u = jax.random.uniform(rng, (n,), jnp.float32)
    one_minus_t_noise = -jnp.log1p(0.9 * (u - 1.0)) / np.log(10.0)
    return _into_range(one_minus_t_noise, eps).astype(jnp.float32)


def logit_normal(rng: jax.Array, n: int, *, mean: float = 0.0, std: float = 1.0, eps: float = 1e-3) -> jax.Array:
    """t = eps + (1 - eps) sigmoid(mean + std z), z ~ N(0, 1): a logit-normal time in [eps, 1]."""
    z = jax.random.normal(rng, (n,), jnp.float32)
    return _into_range(jax.nn.sigmoid(mean + std * z), eps).astype(jnp.float32)


def grid(rng: jax.Array, n: int, *, points: int = 1000) -> jax.Array:
    """t = k / points with k uniform in {0, ..., points} (CAF's code): includes t = 0 (noise).

    The values come from a table of k / points rounded once to float32 (a division on the device
    may be compiled as a multiplication by 1 / points, one rounding off).
    """
    k = jax.random.randint(rng, (n,), 0, points + 1)
    values = (np.arange(points + 1, dtype=np.float64) / points).astype(np.float32)
    return jnp.asarray(values)[k]
