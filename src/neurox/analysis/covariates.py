"""Covariates regressed out of a linear model's features (confound regression) before it is fitted.

``neurox baseline --covariates mean_fd,age,sex`` (and ``neurox probe``) answers whether connectivity (or an
embedding) predicts the target beyond what these explain: each feature's linear fit on the covariates is
removed. The fit is made on the training participants only (fitting it on everyone leaks the test participants
into the features, Snoek et al. 2019), and applied unchanged to validation, test and, from a saved baseline, to
new participants. Numbers enter as they are (centred and scaled); labels (sex, site) as one indicator per
level but the first; ``mean_fd`` is each participant's mean framewise displacement from the store.

``Adjustment`` is everything fitted on the training rows before the linear model and applied unchanged to the
others: ComBat across sites first (``--harmonize``, neurox.analysis.harmonize), then the covariates' removal.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np

from neurox.data.confounds import participant_motion
from neurox.data.loader import missing_value, numeric_values
from neurox.data.store import Store


def covariate_values(store: Store, participants: list[str], columns: list[str], option: str = "--covariates"
                     ) -> tuple[dict[str, list[str]], list[str]]:
    """Participant -> the raw value of each covariate, and the participants lacking one (empty or n/a)."""
    table = {row["participant_id"]: row for row in store.phenotypes()}
    known = set(next(iter(table.values()), {}))
    motion = participant_motion(store) if "mean_fd" in columns else {}
    for column in columns:
        if column == "mean_fd" and not motion and "mean_fd" not in known:
            raise ValueError(f"{option} mean_fd: {store.root} has no head motion (runs prepared without "
                             "their confounds)")
        if column != "mean_fd" and column not in known:
            raise ValueError(f"{option} {column}: not a column of {store.root / 'participants.tsv'} "
                             f"(columns: {', '.join(c for c in known if c != 'participant_id')})")
    values, lacking = {}, []
    for p in participants:
        row = table.get(p, {})
        raw = [str(motion[p]) if column == "mean_fd" and p in motion else str(row.get(column, "")).strip()
               for column in columns]
        if any(missing_value(v) for v in raw):
            lacking.append(p)
        else:
            values[p] = raw
    return values, lacking


def with_covariates(store: Store, cohort, columns: list[str], command: str, option: str = "--covariates"
                    ) -> dict[str, list[str]]:
    """Each participant's covariate values; those lacking one are left out of ``cohort`` (a ``Cohort``) and said
    in one line."""
    if not columns:
        return {}
    values, lacking = covariate_values(store, cohort.participants, columns, option)
    if lacking:
        print(f"neurox {command}: {len(lacking)} of {len(cohort.participants)} participants have no value of "
              f"{', '.join(columns)} ({option}): left out", file=sys.stderr)
        cohort.participants = [p for p in cohort.participants if p in values]
    return values


def covariate_encoding(columns: list[str], rows: list[list[str]]) -> list[dict]:
    """How each covariate enters a design, learned from ``rows`` (a value per column): a number column's mean and
    standard deviation, or a label column's levels."""
    encoding = []
    for i, column in enumerate(columns):
        raw = [r[i] for r in rows]
        try:
            numbers = np.array([float(v) for v in raw])
            encoding.append({"column": column, "mean": float(numbers.mean()), "std": float(numbers.std()) or 1.0})
        except ValueError:
            encoding.append({"column": column, "levels": sorted(set(raw))})
    return encoding


def covariate_design(encoding: list[dict], rows: list[list[str]]) -> np.ndarray:
    """(rows, 1 + terms): an intercept, each number standardised, each label but the first level as 0/1."""
    terms = [np.ones(len(rows))]
    for i, code in enumerate(encoding):
        raw = [r[i] for r in rows]
        if "levels" in code:
            terms += [np.array([v == level for v in raw], dtype=np.float64) for level in code["levels"][1:]]
        else:
            try:
                terms.append((np.array([float(v) for v in raw]) - code["mean"]) / code["std"])
            except ValueError:
                bad = next(v for v in raw if not numeric_values([v]))
                raise ValueError(f"--covariates {code['column']}: {bad!r} is not a number, as the training "
                                 "participants' values were") from None
    return np.stack(terms, axis=1)


class CovariateRemoval:
    """What is removed from the features: the covariates' encoding and each feature's weights on them."""

    def __init__(self, columns: list[str], encoding: list[dict], coef: np.ndarray):
        self.columns, self.encoding, self.coef = columns, encoding, coef

    @classmethod
    def fit(cls, columns: list[str], rows: list[list[str]], x: np.ndarray) -> CovariateRemoval:
        """Fitted on the training rows ``x`` (participants x features), whose covariates are removed in place."""
        from neurox.analysis.baseline import column_blocks  # the wide fit's blocks (baseline imports this module)

        removal = cls(columns, covariate_encoding(columns, rows), np.zeros((0, x.shape[1])))
        design = removal.design(rows)
        inverse = np.linalg.pinv(design)  # least squares, whatever the rank (a level no training row has)
        removal.coef = np.zeros((design.shape[1], x.shape[1]))
        for columns_block, block in column_blocks(x):
            removal.coef[:, columns_block] = inverse @ block
        removal.remove(rows, x)
        return removal

    def design(self, rows: list[list[str]]) -> np.ndarray:
        return covariate_design(self.encoding, rows)

    def remove(self, rows: list[list[str]], x: np.ndarray) -> np.ndarray:
        """``x`` (participants x features, float32) less its fit on the covariates, in place; returned."""
        from neurox.analysis.baseline import column_blocks

        design = self.design(rows)
        for columns_block, _ in column_blocks(x):
            x[:, columns_block] -= (design @ self.coef[:, columns_block]).astype(x.dtype)
        return x

    def arrays(self) -> dict[str, np.ndarray]:
        """For a saved baseline's npz; ``from_arrays`` reads them back."""
        return {"covariates.coef": self.coef.astype(np.float32),
                "covariates.encoding": np.array(json.dumps({"columns": self.columns, "encoding": self.encoding}))}

    @classmethod
    def from_arrays(cls, stored) -> CovariateRemoval | None:
        if "covariates.coef" not in stored:
            return None
        meta = json.loads(str(stored["covariates.encoding"]))
        return cls(meta["columns"], meta["encoding"], stored["covariates.coef"].astype(np.float64))


@dataclasses.dataclass
class Adjustment:
    """The settings and each participant's values; ``fit`` on training rows returns the fitted adjustment, whose
    ``apply`` adjusts any rows in place as it adjusted the training ones."""

    covariate_columns: list[str]
    covariates: dict[str, list[str]]  # participant -> a value per covariate column
    harmonize: str | None = None  # the site column
    sites: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # participant -> [its site]
    harmonisation: object | None = None  # neurox.analysis.harmonize.Harmonisation, once fitted
    removal: CovariateRemoval | None = None

    @classmethod
    def of(cls, store: Store, cohort, covariate_columns: list[str], harmonize: str | None, command: str) -> Adjustment:
        """The values of ``cohort``'s participants; those lacking one are left out of it, in one line."""
        covariates = with_covariates(store, cohort, covariate_columns, command)
        sites = with_covariates(store, cohort, [harmonize], command, "--harmonize") if harmonize else {}
        return cls(list(covariate_columns), covariates, harmonize, sites)

    @classmethod
    def load(cls, stored, store: Store, cohort, command: str) -> Adjustment:
        """A saved run's fits (its npz), with the values of ``cohort``'s participants."""
        from neurox.analysis.harmonize import Harmonisation

        removal, harmonisation = CovariateRemoval.from_arrays(stored), Harmonisation.from_arrays(stored)
        adjustment = cls.of(store, cohort, removal.columns if removal else [],
                            harmonisation.column if harmonisation else None, command)
        if harmonisation is not None:  # a site the fit never saw cannot be harmonised: its participants go
            unseen = [p for p in cohort.participants if adjustment.sites[p][0] not in harmonisation.sites]
            if unseen:
                sites = sorted({adjustment.sites[p][0] for p in unseen})
                print(f"neurox {command}: {len(unseen)} of {len(cohort.participants)} participants come from sites "
                      f"the baseline's harmonisation was not fitted on ({', '.join(sites)}): left out",
                      file=sys.stderr)
                left = set(unseen)
                cohort.participants = [p for p in cohort.participants if p not in left]
        return dataclasses.replace(adjustment, harmonisation=harmonisation, removal=removal)

    def fit(self, participants: list[str], x: np.ndarray) -> Adjustment:
        """Fitted on the rows ``x`` of ``participants``, which are adjusted in place."""
        from neurox.analysis.harmonize import Harmonisation

        harmonisation = Harmonisation.fit(self.harmonize, [self.sites[p][0] for p in participants], x) \
            if self.harmonize else None
        removal = CovariateRemoval.fit(self.covariate_columns, [self.covariates[p] for p in participants], x) \
            if self.covariate_columns else None
        return dataclasses.replace(self, harmonisation=harmonisation, removal=removal)

    def apply(self, participants: list[str], x: np.ndarray) -> np.ndarray:
        if self.harmonisation is not None:
            self.harmonisation.apply([self.sites[p][0] for p in participants], x)
        if self.removal is not None:
            self.removal.remove([self.covariates[p] for p in participants], x)
        return x

    def arrays(self) -> dict[str, np.ndarray]:
        return {**(self.harmonisation.arrays() if self.harmonisation is not None else {}),
                **(self.removal.arrays() if self.removal is not None else {})}
