r"""GP pieces of Phase II: a seeded, quiet BoTorch GP fit, (q)LogEI selection over discrete candidates,
and the Eq. 8 utility with fixed min–max ranges."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch

from autoqra._optional import require
from autoqra.pareto import pareto_mask

log = logging.getLogger(__name__)
#: what needs BoTorch/GPyTorch, for the install hint of a missing library
_FEATURE = "the Phase II GP ('turbo' and 'local' searchers)"


@contextlib.contextmanager
def _torch_quiet(seed: int):
    """One intra-op torch thread, a forked seeded RNG and no warnings, for the duration.

    GP matrices here are tiny (tens of points): extra intra-op threads only spin, and on a busy
    2-core machine a fit took 8-15x longer with 2 threads than with 1.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def fit_gp(X: np.ndarray, Y: np.ndarray, seed: int) -> tuple[Any, np.ndarray]:
    """Fit ``SingleTaskGP`` (scaled Matérn-5/2 ARD, standardised Y, float64) by marginal likelihood.

    Returns:
        ``(model, lengthscales)``; lengthscales in input units, one per column of ``X``.
    """
    ModelFittingError = require("botorch.exceptions", _FEATURE).ModelFittingError
    fit_gpytorch_mll = require("botorch.fit", _FEATURE).fit_gpytorch_mll
    SingleTaskGP = require("botorch.models", _FEATURE).SingleTaskGP
    Standardize = require("botorch.models.transforms.outcome", _FEATURE).Standardize
    Interval = require("gpytorch.constraints", _FEATURE).Interval
    kernels = require("gpytorch.kernels", _FEATURE)
    ExactMarginalLogLikelihood = require("gpytorch.mlls", _FEATURE).ExactMarginalLogLikelihood

    with _torch_quiet(seed):
        Xt, Yt = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(Y, dtype=torch.float64).reshape(-1, 1)
        kern = kernels.MaternKernel(
            nu=2.5, ard_num_dims=Xt.shape[1], lengthscale_constraint=Interval(0.005, 4.0)
        )
        model = SingleTaskGP(
            Xt, Yt, covar_module=kernels.ScaleKernel(kern), outcome_transform=Standardize(m=1)
        )
        try:
            fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        except ModelFittingError as e:  # keep the initial hyper-parameters rather than crash a search
            log.warning("turbo: GP fit failed (%s); using unfitted hyper-parameters", e)
        model.eval()
    return model, kern.lengthscale.detach().cpu().numpy().ravel()


def select(model: Any, F: np.ndarray, best_f: float, n: int, seed: int) -> tuple[list[int], float]:
    """Pick ``n`` distinct rows of candidate features ``F`` by (q)LogEI; returns (row indices, max analytic EI).

    ``n == 1``: argmax of analytic LogEI. ``n > 1``: BoTorch's sequential-greedy discrete batch
    selection (``optimize_acqf_discrete``: each pick is added to ``X_pending`` of a qLogEI with a
    seeded QMC sampler, picked rows are removed from the choices).
    """
    LogExpectedImprovement = require("botorch.acquisition.analytic", _FEATURE).LogExpectedImprovement
    qLogExpectedImprovement = require("botorch.acquisition.logei", _FEATURE).qLogExpectedImprovement
    optimize_acqf_discrete = require("botorch.optim", _FEATURE).optimize_acqf_discrete
    SobolQMCNormalSampler = require("botorch.sampling", _FEATURE).SobolQMCNormalSampler

    Ft = torch.as_tensor(F, dtype=torch.float64)
    with torch.no_grad(), _torch_quiet(seed):
        log_ei = LogExpectedImprovement(model, best_f=best_f)(Ft.unsqueeze(1))
        max_ei = float(log_ei.max().exp())
        if n == 1 or len(F) <= n:
            return torch.argsort(log_ei, descending=True)[:n].tolist(), max_ei
        sampler = SobolQMCNormalSampler(sample_shape=torch.Size([256]), seed=seed)
        acq = qLogExpectedImprovement(model, best_f=best_f, sampler=sampler)
        picked, _ = optimize_acqf_discrete(acq, q=n, choices=Ft, unique=True)
    rows = {tuple(r): i for i, r in reversed(list(enumerate(Ft.tolist())))}  # first index of each row
    chosen = list(dict.fromkeys(rows[tuple(r)] for r in picked.tolist()))
    return chosen, max_ei


@attrs.define
class UtilityScale:
    """Eq. 8 with min–max ranges fixed from a Pareto front: ``α·(s−s_lo)/Δs − (1−α)·(m−m_lo)/Δm``.

    Attributes:
        alpha: weight of the score term, in [0, 1].
        s_lo, s_hi: score range (higher is better).
        m_lo, m_hi: memory range, in bytes. A degenerate range (hi == lo) counts as 1.
    """

    alpha: float
    s_lo: float
    s_hi: float
    m_lo: float
    m_hi: float

    @classmethod
    def from_front(cls, scores: Sequence[float], mem: Sequence[float], alpha: float) -> UtilityScale:
        """Ranges over the Pareto front of ``(scores, mem)`` (mem in bytes)."""
        s, m = np.asarray(scores, float), np.asarray(mem, float)
        k = pareto_mask(s, m)
        return cls(alpha, float(s[k].min()), float(s[k].max()), float(m[k].min()), float(m[k].max()))

    def __call__(self, score: float, mem: float) -> float:
        ds = (self.s_hi - self.s_lo) or 1.0
        dm = (self.m_hi - self.m_lo) or 1.0
        return self.alpha * (score - self.s_lo) / ds - (1 - self.alpha) * (mem - self.m_lo) / dm

    def to_dict(self) -> dict[str, float]:
        return attrs.asdict(self)
