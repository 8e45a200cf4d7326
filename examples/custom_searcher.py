"""A new searcher in ~30 lines: greedy hill climbing over one-step neighbours, registered and used by name.

    python examples/custom_searcher.py       # tiny model, ~1 min
"""

import autoqra
from autoqra.searchers import Searcher, register_searcher


@register_searcher("hillclimb")
class HillClimb(Searcher):
    """Start at the repaired maximum; each round propose the best-so-far's unseen neighbours."""

    def bind(self, ctx):
        super().bind(ctx)
        self.best, self.best_score, self.seen = None, float("-inf"), set()

    def ask(self, n):
        base = self.best or self.ctx.make_feasible(self.ctx.space.maximum())
        pool = [base] if self.best is None else self.ctx.space.neighbours(base)
        out = []
        for a in pool:
            a = self.ctx.make_feasible(a)  # the context repairs to the budget
            if a not in self.seen and len(out) < n:
                self.seen.add(a)
                out.append(a)
        return out

    def tell(self, assignments, results):
        for a, r in zip(assignments, results):
            if r.ok and r.score > self.best_score:
                self.best, self.best_score = a, r.score


def main() -> None:
    model = autoqra.models.tiny_llama()
    res = autoqra.optimize(model, "4bit", phase1="hillclimb", preset="tiny", bits=(2, 4, 8), ranks=(0, 4, 8),
                           train=autoqra.TrainSpec(batch_size=2, seq_len=32, lr=2e-3), eval_blocks=4, progress=False)
    print(res.summary())
    print("phase-1 trials by hillclimb:", sum(t.phase == "phase1" for t in res.history))


if __name__ == "__main__":
    main()
