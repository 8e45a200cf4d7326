r"""Budget-feasible uniform random search (a baseline).

Each candidate is drawn uniformly from the ladders; up to ``max_rejections`` draws are tried to find
one that already fits the budget (uniform over the feasible set when that succeeds), otherwise the
last draw is repaired (least importance lost per byte saved). Points already asked are redrawn
(up to ``max_duplicate_tries`` times), so duplicates only appear once the space is nearly exhausted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from autoqra.problem import Problem
from autoqra.searchers.base import Searcher, register_searcher
from autoqra.space import Assignment

if TYPE_CHECKING:
    from autoqra.evaluators.base import EvalResult

logger = logging.getLogger(__name__)


@register_searcher("random")
class RandomSearcher(Searcher):
    """Seeded uniform random search with rejection then repair.

    Args:
        max_rejections: uniform draws tried per candidate before repairing the last one
            (0 = always repair the first draw).
        max_duplicate_tries: redraws of a candidate equal to an earlier one before accepting it.
        max_trials: optional cap on asked candidates (``done`` afterwards).
    """

    def __init__(self, max_rejections: int = 20, max_duplicate_tries: int = 50, max_trials: int | None = None) -> None:
        if max_rejections < 0 or max_duplicate_tries < 0:
            raise ValueError(
                f"max_rejections={max_rejections!r} and max_duplicate_tries={max_duplicate_tries!r} must be >= 0"
            )
        self.max_rejections = int(max_rejections)
        self.max_duplicate_tries = int(max_duplicate_tries)
        self.max_trials = max_trials

    def bind(self, ctx: Problem) -> None:
        super().bind(ctx)
        self._repair = ctx.repair
        self._asked: list[list[int]] = []
        self._seen: set[tuple[int, ...]] = set()
        self.n_told = 0
        self.best: tuple[Assignment, float] | None = None

    @property
    def done(self) -> bool:
        return self.max_trials is not None and len(self._asked) >= self.max_trials

    def _draw(self) -> Assignment:
        space = self.ctx.space
        a = space.sample(self.rng)
        for _ in range(self.max_rejections):
            if self.ctx.feasible(a):
                return a
            a = space.sample(self.rng)
        return a if self.ctx.feasible(a) else self._repair(a)

    def ask(self, n: int) -> list[Assignment]:
        """``n`` feasible candidates (fewer once ``max_trials`` is reached)."""
        if self.max_trials is not None:
            n = min(n, self.max_trials - len(self._asked))
        out = []
        for _ in range(max(int(n), 0)):
            for _ in range(self.max_duplicate_tries + 1):
                a = self._draw()
                key = tuple(self.ctx.space.encode(a).tolist())
                if key not in self._seen:
                    break
            else:
                logger.debug("random: no unseen assignment found; repeating one")
            self._seen.add(key)
            self._asked.append(list(key))
            out.append(a)
        return out

    def tell(self, assignments: Sequence[Assignment], results: Sequence[EvalResult]) -> None:
        """Count results and keep the best ok one (random search does not learn otherwise)."""
        for a, r in zip(assignments, results):
            self.n_told += 1
            if r.ok and (self.best is None or r.score > self.best[1]):
                self.best = (a, float(r.score))

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the generator state, every asked encoding and the best result so far."""
        best = None if self.best is None else [self.best[0].to_dict(), self.best[1]]
        return {"rng": self.rng.bit_generator.state, "asked": self._asked, "n_told": self.n_told, "best": best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self._asked = [list(map(int, x)) for x in state["asked"]]
        self._seen = {tuple(x) for x in self._asked}
        self.n_told = int(state["n_told"])
        b = state.get("best")
        self.best = None if b is None else (Assignment.from_dict(b[0]), float(b[1]))
