"""Tangent-space connectivity (Varoquaux et al., MICCAI 2010): each participant's matrix as its deviation from
the group's geometric mean, on the manifold of positive definite matrices.

In the benchmark of Dadi et al. (NeuroImage 2019) of connectome-based prediction across cohorts, the tangent
space with a linear model predicted best of the usual choices (correlation, partial correlation). Here it is
computed as nilearn's ``ConnectivityMeasure(kind="tangent")`` computes it, on each run's series standardised
first: a Ledoit-Wolf shrunk covariance of the z-scored series (so positive definite even with fewer frames than
parcels), averaged over the participant's runs; the geometric mean of the training participants' matrices as
the reference (Fletcher and Joshi 2007, Algorithm 3); each participant's ``logm(R^-1/2 C R^-1/2)``.
"""

from __future__ import annotations

import numpy as np


def shrunk_correlation(series: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk covariance of the series z-scored per parcel (sample standard deviation); a parcel
    with a flat series (no voxels on this grid) keeps unit variance and no covariance."""
    from sklearn.covariance import ledoit_wolf

    centred = series - series.mean(0)
    spread = centred.std(0, ddof=1) if len(series) > 1 else np.zeros(series.shape[1])
    flat = spread == 0
    z = centred / np.where(flat, 1.0, spread)
    covariance = ledoit_wolf(z)[0]
    covariance[flat, :] = covariance[:, flat] = 0.0
    covariance[flat, flat] = 1.0
    return covariance


def _eigen_map(function, matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * function(values)) @ vectors.T


def geometric_mean(matrices, max_iter: int = 30, tol: float = 1e-7, report=None) -> np.ndarray:
    """The Riemannian (affine-invariant) mean of positive definite matrices, by gradient descent from their
    arithmetic mean, halving the step whenever the gradient grows. ``matrices``: a list, or anything with a
    length that can be iterated again (a table on disk), read once per step. ``report(step, norm, tol)``, when
    given, hears of each step (a cohort's steps take minutes)."""
    n = len(matrices)
    if not n:
        raise ValueError("tangent space: no participant's matrix to take the group mean of")
    mean = sum(np.asarray(m, dtype=np.float64) for m in matrices) / n
    step, last_norm = 1.0, np.inf
    for iteration in range(max_iter):
        values, vectors = np.linalg.eigh(mean)
        if values.min() <= 0:
            raise ValueError("tangent space: the group mean is not positive definite")
        root = (vectors * np.sqrt(values)) @ vectors.T
        inverse_root = (vectors / np.sqrt(values)) @ vectors.T
        gradient = sum(_eigen_map(np.log, inverse_root @ m @ inverse_root) for m in matrices) / n
        mean = root @ _eigen_map(np.exp, step * gradient) @ root
        norm = np.linalg.norm(gradient) / mean.size
        if norm > last_norm:
            step /= 2.0
            norm = last_norm
        if report is not None:
            report(iteration + 1, norm, tol)
        if norm < tol:
            break
        last_norm = norm
    return mean


def whitening(reference: np.ndarray) -> np.ndarray:
    """``R^-1/2``, which takes a matrix to the tangent space at the reference ``R``."""
    return _eigen_map(lambda v: 1.0 / np.sqrt(v), reference)


def tangent_matrix(matrix: np.ndarray, whitening: np.ndarray) -> np.ndarray:
    """``logm(W C W)``: the matrix in the tangent space at the reference whose ``whitening`` is W. Symmetric; its
    diagonal (a parcel's variance relative to the group's) is information too."""
    return _eigen_map(np.log, whitening @ matrix @ whitening)
