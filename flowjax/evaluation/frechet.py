"""Frechet distance between Gaussians fitted to feature sets (FID, fd_digits).

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

tr((S1 S2)^(1/2)) equals the sum of square roots of the eigenvalues of the symmetric
positive semi-definite A = S1^(1/2) S2 S1^(1/2), which is computed with symmetric
eigendecompositions in float64: no complex parts to discard, no offset to add, and no
failure on singular covariances (fewer samples than feature dimensions).
"""

import numpy as np


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of features (N, D) in float64; sigma is the unbiased covariance."""
    features = np.asarray(features, np.float64).reshape(len(features), -1)
    if len(features) < 2:
        raise ValueError(f'statistics need at least 2 feature vectors, got {len(features)}')
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance of N(mu1, sigma1) and N(mu2, sigma2) (what FID reports)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f'frechet_distance: mismatched statistics {mu1.shape}, {sigma1.shape} vs '
                         f'{mu2.shape}, {sigma2.shape}')
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    values = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = float(np.sum(np.sqrt(np.clip(values, 0.0, None))))
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(value, 0.0)
