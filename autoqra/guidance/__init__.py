r"""What the search knows before (and between) trials, and the moves it makes with it.

* :mod:`~autoqra.guidance.importance` — the paper's layer-importance priors (I_q, I_r).
* :mod:`~autoqra.guidance.costmodel` — the calibrated cost model: predicted score change (nats) of every
  unit's bit-width and rank, from forward passes and short probes.
* :mod:`~autoqra.guidance.probes` — the rank probes: trained probe models and each unit's leave-one-out gain.
* :mod:`~autoqra.guidance.repair` — make any assignment fit the budget, cutting least damage per byte.
* :mod:`~autoqra.guidance.moves` — byte-neutral edits (fill, swap down/up, random edit).
* :mod:`~autoqra.guidance.knapsack` — the exact multiple-choice knapsack (k best assignments).
* :mod:`~autoqra.guidance.seeds` — warm starts built from the above.

Units: bytes for memory, nats for predicted score changes (higher score is better).
"""

from autoqra.guidance.costmodel import CostModel, measure_cost_model
from autoqra.guidance.importance import Importance, compute_importance
from autoqra.guidance.repair import Repairer, make_repair

__all__ = ["CostModel", "Importance", "Repairer", "compute_importance", "make_repair", "measure_cost_model"]
