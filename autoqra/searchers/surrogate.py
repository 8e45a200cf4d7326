r"""Promotion surrogate (paper Eq. 7): predict the high-fidelity score of a low-fidelity-evaluated candidate.

Features per candidate: ``[low score, memory (GiB), q_cov, r_cov, bits histogram, rank histogram]``
with ``q_cov = mean_u I_q(u) * s_q(u)`` and ``r_cov = mean_u I_r(u) * s_r(u)`` (``s`` = ladder position
in [0, 1]) and histograms as fractions of units per ladder value. Inputs are z-scored.

Model: MLP ``d -> 64 -> 32 -> 1`` with GELU, Huber loss (delta 1) + ``l2 * sum(w**2)``, full-batch
Adam (lr 1e-3), up to 500 epochs, early stopping with patience 10 on a 20 % validation split; the
final model is refit on all pairs for the best epoch count. By default (``residual=True``, a
deviation from the paper's direct regression) the MLP learns the correction ``high - low``, so with
little data it stays close to the low-fidelity ranking. Training is deterministic given ``seed``
(``torch.random.fork_rng`` + ``manual_seed``; the global RNG is left untouched).

With fewer than ``min_pairs`` (low, high) pairs the surrogate is not fitted and ranks by the
low-fidelity score. Quality: ``last_spearman`` is Spearman's rho of predictions vs truth on the
validation split (``None`` with < 3 validation pairs); ``last_spearman_low`` is the same for the
low-fidelity score alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from autoqra.space import Assignment, SearchSpace

logger = logging.getLogger(__name__)
_GIB = float(2**30)


@attrs.frozen
class PairRecord:
    """One candidate: its assignment, low-fidelity score, footprint in bytes and (once known) high score."""

    assignment: Assignment
    low: float
    bytes: int
    high: float | None = None


def _as_record(r: PairRecord | Sequence[Any]) -> PairRecord:
    return r if isinstance(r, PairRecord) else PairRecord(*r)


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.shape[0] < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    rho = spearmanr(a, b).statistic
    return None if not math.isfinite(rho) else float(rho)


def _scale(y: np.ndarray) -> float:
    sd = float(y.std())
    return sd if sd > 1e-12 else 1.0


class Surrogate:
    """Low-to-high fidelity score predictor used to pick which candidates to promote.

    Args:
        space: the search space (for the ordinal encoding and the histograms).
        importance_q: per-unit quantization sensitivity (``None`` -> 0.5).
        importance_r: per-unit adaptation demand (``None`` -> 0.5).
        min_pairs: (low, high) pairs needed before fitting; below it :meth:`predict` returns the low score.
        hidden: hidden layer widths.
        lr: Adam learning rate.
        max_epochs: full-batch epochs at most.
        patience: early-stopping patience in epochs.
        val_fraction: fraction of pairs held out for early stopping and the Spearman report.
        l2: weight of the squared-norm penalty on the MLP weights.
        residual: learn ``high - low`` instead of ``high``.
        seed: seed of the split and of the weight initialisation.
    """

    def __init__(
        self,
        space: SearchSpace,
        importance_q: Sequence[float] | np.ndarray | None = None,
        importance_r: Sequence[float] | np.ndarray | None = None,
        min_pairs: int = 6,
        hidden: tuple[int, ...] = (64, 32),
        lr: float = 1e-3,
        max_epochs: int = 500,
        patience: int = 10,
        val_fraction: float = 0.2,
        l2: float = 1e-4,
        residual: bool = True,
        seed: int = 0,
    ) -> None:
        if min_pairs < 2:
            raise ValueError(f"min_pairs={min_pairs!r} must be >= 2")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction!r} must lie in [0, 1)")
        self.space = space
        n = space.n_units
        self.iq = np.full(n, 0.5) if importance_q is None else np.asarray(importance_q, dtype=float)
        self.ir = np.full(n, 0.5) if importance_r is None else np.asarray(importance_r, dtype=float)
        self.min_pairs, self.hidden, self.lr = int(min_pairs), tuple(hidden), float(lr)
        self.max_epochs, self.patience, self.val_fraction = int(max_epochs), int(patience), float(val_fraction)
        self.l2, self.residual, self.seed = float(l2), bool(residual), int(seed)
        self.net: nn.Module | None = None
        self.n_pairs = 0
        self.last_spearman: float | None = None
        self.last_spearman_low: float | None = None
        self.best_epochs = 0

    # --------------------------------------------------------------- features
    @property
    def n_features(self) -> int:
        return 4 + len(self.space.bits) + len(self.space.ranks)

    def features(self, assignment: Assignment, low: float, nbytes: int) -> np.ndarray:
        """Feature vector of one candidate (``nbytes`` = its footprint in bytes)."""
        n = self.space.n_units
        x = self.space.encode(assignment)
        o = self.space.ordinal(assignment)
        hb = np.bincount(x[:n], minlength=len(self.space.bits)) / n
        hr = np.bincount(x[n:], minlength=len(self.space.ranks)) / n
        head = [float(low), nbytes / _GIB, float(np.mean(self.iq * o[:n])), float(np.mean(self.ir * o[n:]))]
        return np.concatenate([head, hb, hr])

    def feature_matrix(self, candidates: Sequence[PairRecord | Sequence[Any]]) -> np.ndarray:
        """Features of ``(assignment, low, bytes[, high])`` records, shape ``(n, n_features)``."""
        rows = [self.features(r.assignment, r.low, r.bytes) for r in map(_as_record, candidates)]
        return np.array(rows, dtype=float).reshape(len(rows), self.n_features)

    # -------------------------------------------------------------------- fit
    @property
    def is_fitted(self) -> bool:
        return self.net is not None

    def _make_net(self, d: int) -> nn.Module:
        layers: list[nn.Module] = []
        for h in self.hidden:
            layers += [nn.Linear(d, h), nn.GELU()]
            d = h
        return nn.Sequential(*layers, nn.Linear(d, 1)).double()

    def _train(self, X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor | None, yv: torch.Tensor | None, epochs: int):
        torch.manual_seed(self.seed)
        net = self._make_net(X.shape[1])
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        loss_fn = nn.HuberLoss(delta=1.0)
        best, best_state, best_epoch, bad = math.inf, None, epochs, 0
        for ep in range(1, epochs + 1):
            opt.zero_grad()
            reg = sum((p**2).sum() for name, p in net.named_parameters() if name.endswith("weight"))
            loss = loss_fn(net(X).squeeze(-1), y) + self.l2 * reg
            loss.backward()
            opt.step()
            if Xv is None:
                continue
            with torch.no_grad():
                v = float(loss_fn(net(Xv).squeeze(-1), yv))
            if v < best - 1e-12:
                best, bad, best_epoch = v, 0, ep
                best_state = {k: t.clone() for k, t in net.state_dict().items()}
            else:
                bad += 1
                if bad >= self.patience:
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        return net, best_epoch

    def fit(self, records: Sequence[PairRecord | Sequence[Any]]) -> Surrogate:
        """Fit on the records that have a finite high score (no-op below ``min_pairs``)."""
        recs = [r for r in map(_as_record, records) if r.high is not None and math.isfinite(r.high)]
        recs = [r for r in recs if math.isfinite(r.low)]
        self.n_pairs = len(recs)
        if self.n_pairs < self.min_pairs:
            self.net = None
            return self
        F = self.feature_matrix(recs)
        high = np.array([r.high for r in recs], dtype=float)
        y = high - F[:, 0] if self.residual else high
        n = len(recs)
        perm = np.random.default_rng(self.seed).permutation(n)
        n_val = int(round(self.val_fraction * n)) if n >= 5 else 0
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny MLP: intra-op threads only add overhead (10-40x on 2 cores)
        try:
            self._fit_arrays(F, high, y, perm[:n_val], perm[n_val:])
        finally:
            torch.set_num_threads(threads)
        logger.debug("surrogate: %d pairs, %d epochs, spearman %s", n, self.best_epochs, self.last_spearman)
        return self

    def _fit_arrays(self, F: np.ndarray, high: np.ndarray, y: np.ndarray, val: np.ndarray, tr: np.ndarray) -> None:
        n_val = len(val)
        with torch.random.fork_rng(devices=[]):
            self._mu, self._sd = F[tr].mean(0), F[tr].std(0)
            self._sd[self._sd < 1e-12] = 1.0
            self._ymu, self._ysd = float(y[tr].mean()), _scale(y[tr])
            t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
            Xz, yz = t((F - self._mu) / self._sd), t((y - self._ymu) / self._ysd)
            if n_val:
                net, self.best_epochs = self._train(Xz[tr], yz[tr], Xz[val], yz[val], self.max_epochs)
                self.net = net
                pv = self.predict(F[val])
                self.last_spearman = _spearman(pv, high[val])
                self.last_spearman_low = _spearman(F[val, 0], high[val])
            else:
                self.best_epochs, self.last_spearman, self.last_spearman_low = self.max_epochs, None, None
            self._mu, self._sd = F.mean(0), F.std(0)
            self._sd[self._sd < 1e-12] = 1.0
            self._ymu, self._ysd = float(y.mean()), _scale(y)
            Xz, yz = t((F - self._mu) / self._sd), t((y - self._ymu) / self._ysd)
            self.net, _ = self._train(Xz, yz, None, None, max(self.best_epochs, 1))

    # ---------------------------------------------------------------- predict
    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted high-fidelity scores for a feature matrix (the low score when unfitted)."""
        F = np.atleast_2d(np.asarray(features, dtype=float))
        if self.net is None:
            return F[:, 0].copy()
        with torch.no_grad():
            z = self.net(torch.as_tensor((F - self._mu) / self._sd, dtype=torch.float64)).squeeze(-1).numpy()
        out = z * self._ysd + self._ymu
        return out + F[:, 0] if self.residual else out

    def predict_records(self, candidates: Sequence[PairRecord | Sequence[Any]]) -> np.ndarray:
        """Predicted high-fidelity scores of ``(assignment, low, bytes)`` candidates."""
        return self.predict(self.feature_matrix(candidates)) if len(candidates) else np.zeros(0)

    def rank(self, candidates: Sequence[PairRecord | Sequence[Any]]) -> np.ndarray:
        """Candidate indices, best predicted first (stable: ties keep input order)."""
        return np.argsort(-self.predict_records(candidates), kind="stable")

    def report(self) -> dict[str, Any]:
        """JSON-able quality summary of the last fit."""
        return {
            "fitted": self.is_fitted,
            "n_pairs": self.n_pairs,
            "epochs": self.best_epochs,
            "spearman": self.last_spearman,
            "spearman_low_only": self.last_spearman_low,
        }
