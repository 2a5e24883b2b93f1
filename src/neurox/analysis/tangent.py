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


def geometric_mean(matrices, max_iter: int = 30, tol: float = 1e-7, report=None, tangent_sum=None) -> np.ndarray:
    """The Riemannian (affine-invariant) mean of positive definite matrices, by gradient descent from their
    arithmetic mean, halving the step whenever the gradient grows. ``matrices``: a list, or anything with a
    length that can be iterated again (a table on disk), read once per step. ``report(step, norm, tol)``, when
    given, hears of each step (a cohort's steps take minutes). ``tangent_sum(W)``, when given, is the sum of
    ``tangent_matrix(m, W)`` over the matrices, computed elsewhere (``tangent_table``: in worker processes)."""
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
        gradient = (tangent_sum(inverse_root) if tangent_sum is not None
                    else sum(tangent_matrix(m, inverse_root) for m in matrices)) / n
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


def tangent_table(table, reference_rows=None, workers: int = 1, progress: bool = False,
                  command: str = "connectivity") -> np.ndarray:
    """Replaces each matrix of a MatrixTable (neurox.analysis.matrix_table) by its tangent-space projection at
    the geometric mean of the matrices of ``reference_rows`` (every row by default), in place, and returns that
    mean. Each step of the mean and the projection is a pass over the table computing an eigendecomposition per
    matrix; with ``workers`` > 1 each pass is split over that many processes (one BLAS thread each), which
    read, and for the projection write, their own rows. ``progress``: each step of the mean is reported on a
    line starting with ``command``, and the projection shows a progress bar."""
    import contextlib
    import sys
    from concurrent.futures import as_completed
    from functools import partial

    from neurox.progress import progress as progress_display
    from neurox.workers import process_pool

    rows = list(range(len(table))) if reference_rows is None else list(reference_rows)
    everyone = list(range(len(table)))
    pool = process_pool(min(workers, len(table))) if workers > 1 and len(table) > 1 else None
    pieces = 4 * workers  # (with a pool) several pieces a worker: an even finish, a moving progress bar

    def split(selected: list[int]) -> list[list[int]]:
        return [list(piece) for piece in np.array_split(selected, min(pieces, len(selected))) if len(piece)]

    def report(step: int, norm: float, tol: float) -> None:
        if progress:
            print(f"{command}: tangent space, the geometric mean of {len(rows)} participants: step {step}, gradient "
                  f"{norm:.2g} (done below {tol:g})", file=sys.stderr)

    def tangent_sum(to_tangent: np.ndarray) -> np.ndarray:
        jobs = [pool.submit(_sum_in_tangent_space, table.path, table.size, piece, to_tangent) for piece in split(rows)]
        return sum(job.result() for job in jobs)

    with pool or contextlib.nullcontext():  # the pool, on an error or Ctrl-C, drops what is queued
        reference = geometric_mean(table.rows(rows), report=report, tangent_sum=tangent_sum if pool else None)
        project = partial(tangent_matrix, whitening=whitening(reference))
        bar = progress_display(total=len(everyone), desc="tangent space", unit="participant", disable=not progress)
        if pool is None:
            for row in everyone:
                table.transform(project, [row])
                bar.update(1)
        else:
            jobs = {pool.submit(_project_rows, table.path, table.size, piece, project): len(piece)
                    for piece in split(everyone)}
            for job in as_completed(jobs):
                job.result()
                bar.update(jobs[job])
        bar.close()
    return reference


def _sum_in_tangent_space(path, size: int, rows: list[int], to_tangent: np.ndarray) -> np.ndarray:
    from neurox.analysis.matrix_table import MatrixTable

    return sum(tangent_matrix(m, to_tangent) for m in MatrixTable(path, size).matrices(rows))


def _project_rows(path, size: int, rows: list[int], project) -> None:
    from neurox.analysis.matrix_table import MatrixTable

    MatrixTable(path, size).transform(project, rows)
