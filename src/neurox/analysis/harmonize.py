"""ComBat harmonisation of features across sites or scanners (``--harmonize COLUMN``): before a linear model, and
before edgewise statistics.

Multi-site cohorts (ABCD's 21 sites, UK Biobank's imaging centres) carry each site's scanner in every connectivity
edge: a shift and a scaling per site and feature. ComBat (Johnson et al. 2007, Biostatistics; for connectivity Yu et
al. 2018, Human Brain Mapping) estimates both per feature, and shrinks them towards the site's average over all
features by empirical Bayes, so that sites of a few dozen participants are estimated well. Each feature is
standardised by its overall mean and pooled within-site standard deviation; a site's shift ``gamma`` and scale
``delta`` (a variance) of the standardised values are drawn towards their priors (normal for ``gamma``, inverse gamma
for ``delta``, fitted over features by the method of moments) and the feature is rebuilt as
``(x - mean - sd * gamma) / sqrt(delta) + mean``. This is neuroCombat's parametric empirical Bayes (tested
against it).

Before a linear model (``--harmonize`` of baseline and probe), as for covariates, the fit is made on the training
participants only and applied unchanged to validation, test and new participants; a site needs 2 training
participants or more, and a participant of a site no training participant comes from cannot be harmonised (an error:
a site is learned from its own participants only). No biological covariate is preserved: preserving the target would
need the test participants' labels. Where the target differs between sites, harmonisation removes that part of it
too; `--split_by` a site column (every site tested by a model that never saw it) is the check that needs no
harmonisation.

For edgewise statistics (``neurox connectivity --group_by G --harmonize SITE``, ``harmonised_slices``): all
participants are harmonised together and the group (or slope) and covariates tested are preserved, as neuroCombat
does with covariates: each feature's expected value is the least-squares fit on the sites and those terms, without
the sites' part. The features are read in slices of edges, twice (the priors need every edge's site estimates).
"""

from __future__ import annotations

import json

import numpy as np

MAX_ITERATIONS = 1000  # of the empirical Bayes estimates; they converge in tens
TOLERANCE = 1e-4  # neuroCombat's: the largest relative change of an estimate


class Harmonisation:
    """What a fit learned: per feature its mean and pooled standard deviation; per site and feature the shrunk
    shift ``gamma`` and scale ``delta`` of the standardised values."""

    def __init__(self, column: str, sites: list[str], mean: np.ndarray, sd: np.ndarray, gamma: np.ndarray,
                 delta: np.ndarray):
        self.column, self.sites, self.mean, self.sd, self.gamma, self.delta = column, sites, mean, sd, gamma, delta

    @classmethod
    def fit(cls, column: str, site_of_rows: list[str], x: np.ndarray) -> Harmonisation:
        """Fitted on the training rows ``x`` (participants x features), which are harmonised in place."""
        from neurox.analysis.baseline import column_blocks  # baseline imports this module

        sites, index, counts = _site_index(column, site_of_rows, "training participants")
        one_hot = np.eye(len(sites))[index]  # (rows, sites)
        solve = np.linalg.pinv(one_hot)
        mean, sd = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        gamma_hat, delta_hat = np.zeros((len(sites), x.shape[1])), np.zeros((len(sites), x.shape[1]))
        for columns, block in column_blocks(x):
            z, stand_mean, sd[columns] = _standardised(block, one_hot, solve, counts)  # blocks come as float64
            mean[columns] = stand_mean[0]  # no covariates: the sites' means weighted by their participants
            gamma_hat[:, columns], delta_hat[:, columns] = _site_estimates(z, one_hot, index, counts)
        gamma, delta = _shrunk(gamma_hat, delta_hat, counts)
        harmonisation = cls(column, sites, mean, sd, gamma, delta)
        harmonisation.apply(site_of_rows, x)
        return harmonisation

    def apply(self, site_of_rows: list[str], x: np.ndarray) -> np.ndarray:
        """``x`` (participants x features, float32) harmonised with the fit, in place; returned."""
        from neurox.analysis.baseline import column_blocks

        unknown = sorted(set(site_of_rows) - set(self.sites))
        if unknown:
            raise ValueError(f"--harmonize {self.column}: no training participant comes from {', '.join(unknown)}; "
                             "ComBat learns a site's effect from its own participants only (with --split_by "
                             f"{self.column} every site is tested unseen: leave --harmonize out)")
        index = np.array([self.sites.index(s) for s in site_of_rows], dtype=int)
        for columns, block in column_blocks(x):
            shift = self.mean[columns] + self.sd[columns] * self.gamma[index, columns]
            x[:, columns] = ((block - shift) / np.sqrt(self.delta[index, columns]) + self.mean[columns]).astype(x.dtype)
        return x

    def arrays(self) -> dict[str, np.ndarray]:
        """For a saved baseline's npz; ``from_arrays`` reads them back."""
        return {"harmonize.mean": self.mean, "harmonize.sd": self.sd, "harmonize.gamma": self.gamma.astype(np.float32),
                "harmonize.delta": self.delta.astype(np.float32),
                "harmonize.sites": np.array(json.dumps({"column": self.column, "sites": self.sites}))}

    @classmethod
    def from_arrays(cls, stored) -> Harmonisation | None:
        if "harmonize.mean" not in stored:
            return None
        meta = json.loads(str(stored["harmonize.sites"]))
        return cls(meta["column"], meta["sites"], stored["harmonize.mean"], stored["harmonize.sd"],
                   stored["harmonize.gamma"].astype(np.float64), stored["harmonize.delta"].astype(np.float64))


def harmonised_slices(read, n_features: int, chunk: int, column: str, site_of_rows: list[str],
                      preserved: np.ndarray):
    """ComBat of features read in slices, keeping the effects of ``preserved`` (rows x k: the group or slope and
    the covariates tested afterwards), as neuroCombat does with covariates. ``read(lo, hi)`` gives the rows'
    features lo..hi (rows x (hi - lo), float64); yields ``(lo, harmonised slice)``. Two passes: the first takes
    each site's sample shift and variance of every standardised feature (what the empirical Bayes priors are
    fitted over), the second rebuilds each slice with the shrunk estimates. Memory stays at rows x ``chunk``."""
    sites, index, counts = _site_index(column, site_of_rows, "participants")
    one_hot = np.eye(len(sites))[index]
    design = np.column_stack([one_hot, preserved])
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise ValueError(f"--harmonize {column}: the sites cannot be told apart from the effect and covariates "
                         "tested (a site of one group only, or a covariate that is the site); ComBat would remove "
                         "the effect with the sites")
    solve = np.linalg.pinv(design)  # once: each slice's least-squares fit is then one product
    gamma_hat, delta_hat = [], []
    for lo in range(0, n_features, chunk):
        z, _, _ = _standardised(read(lo, lo + chunk), design, solve, counts)
        g, d = _site_estimates(z, one_hot, index, counts)
        gamma_hat.append(g)
        delta_hat.append(d)
    gamma, delta = _shrunk(np.concatenate(gamma_hat, axis=1), np.concatenate(delta_hat, axis=1), counts)
    for lo in range(0, n_features, chunk):
        z, stand_mean, sd = _standardised(read(lo, lo + chunk), design, solve, counts)
        columns = slice(lo, lo + z.shape[1])
        yield lo, (z - gamma[index, columns]) / np.sqrt(delta[index, columns]) * sd + stand_mean


def _site_index(column: str, site_of_rows: list[str], who: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The sites (sorted), each row's site index and each site's count; a site of fewer than 2 rows is an error."""
    sites = sorted(set(site_of_rows))
    index = np.array([sites.index(s) for s in site_of_rows], dtype=int)
    counts = np.bincount(index, minlength=len(sites))
    few = [f"{s} ({c})" for s, c in zip(sites, counts) if c < 2]
    if few:
        raise ValueError(f"--harmonize {column}: a site needs 2 {who} or more to estimate its effect; these have "
                         f"fewer: {', '.join(few)}")
    return sites, index, counts


def _standardised(block: np.ndarray, design: np.ndarray, solve: np.ndarray, counts: np.ndarray):
    """neuroCombat's standardisation of ``block`` (rows x features): the least-squares fit on ``design`` (the sites'
    indicators, then any preserved covariates; ``solve`` its pseudo-inverse); each row's expected value without the
    site (the sites' coefficients weighted by their participants, plus the covariates' part), and the pooled
    residual standard deviation. Returns (z, that expected value, sd)."""
    n_sites = len(counts)
    beta = solve @ block
    stand_mean = (counts / counts.sum()) @ beta[:n_sites] + design[:, n_sites:] @ beta[n_sites:]
    pooled = ((block - design @ beta) ** 2).mean(0)
    sd = np.sqrt(np.where(pooled > 0, pooled, 1.0))
    return (block - stand_mean) / sd, stand_mean, sd


def _site_estimates(z: np.ndarray, one_hot: np.ndarray, index: np.ndarray, counts: np.ndarray):
    """Each site's sample shift and variance of the standardised features (sites x features)."""
    gamma_hat = (one_hot.T @ z) / counts[:, None]
    spread = (one_hot.T @ (z - gamma_hat[index]) ** 2) / (counts[:, None] - 1)
    return gamma_hat, np.where(spread > 0, spread, 1.0)


def _shrunk(gamma_hat: np.ndarray, delta_hat: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The parametric empirical Bayes estimates (sites x features), from each site's sample shift and variance of
    the standardised features. The sum of squares about a shift ``g`` comes from the two: ``(n-1) delta_hat +
    n (gamma_hat - g)^2``, so no pass over the data is needed."""
    n = counts[:, None].astype(np.float64)
    gamma_bar = gamma_hat.mean(1, keepdims=True)
    t2 = gamma_hat.var(1, ddof=1, keepdims=True) if gamma_hat.shape[1] > 1 else np.ones_like(gamma_bar)
    m = delta_hat.mean(1, keepdims=True)
    s2 = delta_hat.var(1, ddof=1, keepdims=True) if delta_hat.shape[1] > 1 else np.zeros_like(m)
    s2 = np.where(s2 > 0, s2, np.finfo(np.float64).tiny)  # every feature alike: the prior holds them fixed
    a, b = (2 * s2 + m**2) / s2, (m * s2 + m**3) / s2
    gamma, delta = gamma_hat.copy(), delta_hat.copy()
    for _ in range(MAX_ITERATIONS):
        new_gamma = (t2 * n * gamma_hat + delta * gamma_bar) / (t2 * n + delta)
        squares = (n - 1) * delta_hat + n * (gamma_hat - new_gamma) ** 2
        new_delta = (0.5 * squares + b) / (n / 2 + a - 1)
        change = max(_relative(new_gamma, gamma), _relative(new_delta, delta))
        gamma, delta = new_gamma, new_delta
        if change < TOLERANCE:
            break
    return gamma, delta


def _relative(new: np.ndarray, old: np.ndarray) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        change = np.abs(new - old) / np.abs(old)
    return float(np.nanmax(np.where(np.isfinite(change), change, 0.0))) if change.size else 0.0
