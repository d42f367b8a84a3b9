"""Training-time distributions: support, and a Kolmogorov-Smirnov test against the analytic CDF."""

import jax
import numpy as np
import pytest
from scipy import special, stats

from flowjax.flows import timesteps

N = 20_000
EPS = 1e-3


def _draw(fn, **kw):
    t = fn(jax.random.key(7), N, **kw)
    assert t.shape == (N,) and t.dtype == np.float32
    return np.asarray(t, np.float64)


def test_uniform_is_unchanged():
    key = jax.random.key(3)
    expected = jax.random.uniform(key, (1000,), np.float32, minval=EPS, maxval=1.0)
    np.testing.assert_array_equal(timesteps.uniform(key, 1000, eps=EPS), expected)
    t = _draw(timesteps.uniform, eps=EPS)
    assert t.min() >= EPS and t.max() < 1.0
    assert stats.kstest(t, stats.uniform(EPS, 1 - EPS).cdf).pvalue > 1e-3


def _u_shaped_cdf(a):
    margin = timesteps.U_SHAPED_MARGIN

    def cdf(t):  # of t' = t (1 - 2 margin) + margin, t with density a cosh(a (t - 1/2)) / (2 sinh(a / 2))
        t = np.clip((t - margin) / (1 - 2 * margin), 0.0, 1.0)
        return (np.sinh(a * (t - 0.5)) + np.sinh(a / 2)) / (2 * np.sinh(a / 2))

    return cdf


@pytest.mark.parametrize('a', [0.5, 4.0, 12.0])
def test_u_shaped(a):
    t = _draw(timesteps.u_shaped, a=a)
    assert t.min() >= 1e-5 * (1 - 1e-6) and t.max() <= 1 - 1e-5 * (1 - 1e-6)
    assert stats.kstest(t, _u_shaped_cdf(a)).pvalue > 1e-3
    if a >= 4:  # U-shaped: the ends much denser than the middle
        assert np.mean((t < 0.1) | (t > 0.9)) > 2 * np.mean(np.abs(t - 0.5) < 0.1)
    assert np.mean(t < 0.5) == pytest.approx(0.5, abs=0.02)


def test_u_shaped_large_a_is_finite():
    t = timesteps.u_shaped(jax.random.key(0), 4096, a=200.0)
    assert np.all(np.isfinite(t)) and np.all((t >= 0) & (t <= 1))


def test_exp10():
    t = _draw(timesteps.exp10, eps=EPS)
    assert t.min() >= EPS - 1e-7 and t.max() <= 1.0
    # t = eps + (1 - eps)(1 - t_noise), P(t_noise <= s) = (10^s - 1) / 9.
    def cdf(t):
        s = np.clip(1 - (t - EPS) / (1 - EPS), 0.0, 1.0)
        return 1 - (10 ** s - 1) / 9

    assert stats.kstest(t, cdf).pvalue > 1e-3
    # More mass near noise (t small): P(t < 1/2) = 1 - (sqrt(10) - 1) / 9 ~ 0.76.
    assert np.mean(t < 0.5) == pytest.approx(1 - (np.sqrt(10) - 1) / 9, abs=0.02)


@pytest.mark.parametrize('mean,std', [(0.0, 1.0), (-0.5, 2.0)])
def test_logit_normal(mean, std):
    t = _draw(timesteps.logit_normal, mean=mean, std=std, eps=EPS)
    assert t.min() >= EPS - 1e-7 and t.max() <= 1.0

    def cdf(t):
        y = np.clip((t - EPS) / (1 - EPS), 1e-12, 1 - 1e-12)
        return stats.norm.cdf((special.logit(y) - mean) / std)

    assert stats.kstest(t, cdf).pvalue > 1e-3


@pytest.mark.parametrize('points', [1, 4, 1000])
def test_grid(points):
    t = _draw(timesteps.grid, points=points)
    k = np.rint(t * points)
    np.testing.assert_array_equal(t, (k / points).astype(np.float32))
    assert k.min() == 0 and k.max() == points
    counts = np.bincount(k.astype(int), minlength=points + 1)
    if points < 100:  # k uniform in {0, ..., points}
        assert stats.chisquare(counts).pvalue > 1e-3
    else:  # close to U[0, 1]
        assert stats.kstest(t, 'uniform').pvalue > 1e-3

