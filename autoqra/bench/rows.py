r"""The benchmark's presets and rows (data only; run by :mod:`autoqra.bench.harness`)."""

from __future__ import annotations

import attrs

from autoqra.config import TrainSpec


@attrs.frozen
class BenchPreset:
    """One benchmark configuration (model, search preset, final-training recipe, seeds)."""

    name: str
    model: str  # autoqra.models.load_model name
    search_preset: str  # OptimizeConfig preset of every search
    train: TrainSpec
    final_steps: int
    final_eval_blocks: int | None  # test-split blocks scored after final training (None = all)
    seeds: tuple[int, ...]  # final-training seeds (searches use search_seed)
    bits: tuple[int, ...] = (2, 3, 4, 8)
    ranks: tuple[int, ...] = (0, 4, 8, 16)
    search_seed: int = 0
    search_options: dict = attrs.Factory(dict)  # extra OptimizeConfig fields of every search
    # existing search stores copied in when ours do not exist yet: {our store file name: source path}
    seed_stores: dict = attrs.Factory(dict)
    threads: int | None = None  # torch threads during the benchmark (None = leave as is)
    precision: str = "auto"  # the model is loaded in its dtype; every search and final training uses it
    rows: tuple[str, ...] | None = None  # the row ids this preset runs (None = all)


#: the store-name tail of benchmarks/no_regret.py's searches at today's demo preset (``_common.search_key``: rank
#: ladder, embedding mode, digest of the preset's sizes); a missing source store is simply not copied
DEMO_SEARCH = "r4-8-16-e-search-291952f4"

BENCH_PRESETS: dict[str, BenchPreset] = {
    # tiny random Llama, seconds per evaluation: checks the harness (tests/test_bench.py)
    "quick": BenchPreset("quick", "tiny", "tiny", TrainSpec(batch_size=2, seq_len=32, lr=2e-3), final_steps=8,
                         final_eval_blocks=8, seeds=(0, 1), search_options={"max_generations": 1}, threads=1),
    # SmolLM2 + the embedded pydoc task; the default searches are those of benchmarks/search_vs_seed.py
    # (same configuration: their stores are copied in, so they are read back, not run again)
    "full": BenchPreset("full", "default", "demo", TrainSpec(), final_steps=60, final_eval_blocks=64, seeds=(0, 1),
                        seed_stores={**{f"search-s{s}-cost-{b}.db": f"benchmarks/runs/search_vs_seed/{n}-s{s}.db"
                                        for s in (0, 1) for b, n in (("4bit", "B4"), ("mid", "Bmid"))},
                                     # today's default: the searches of benchmarks/no_regret.py (same config)
                                     **{f"default-s{s}-{b}.db": f"benchmarks/runs/searches/search-{n}-{s}-{DEMO_SEARCH}.db"
                                        for s in (0, 1) for b, n in (("4bit", "B4"), ("mid", "Bmid"))}},
                        rows=("lora16-r8", "lora16-r16", "hqq8-r8", "hqq4-r8", "hqq4-r16", "nf4-r8", "nf4-r16",
                              "hqq3-r8", "hqq4-r8-emb8", "hqq4-r8-emb4", "rule-emb8", "autoqra", "autoqra-mid", "autoqra-anchored", "autoqra-mid-anchored",
                              "guided", "guided-mid", "guided-s1", "guided-mid-s1", "guided-adapted",
                              "guided-mid-adapted", "default", "default-mid", "default-s1", "default-mid-s1",
                              "random")),
}


@attrs.frozen
class RowSpec:
    """One benchmark row. ``kind``: ``"uniform"`` (fixed assignment), ``"search"`` (autoqra.optimize with
    ``options``) or ``"random"`` (random search with AutoQRA's number of high-fidelity evaluations)."""

    id: str
    label: str
    kind: str
    backend: str = "hqq"
    bits: int = 0
    rank: int = 0
    budget: str = "4bit"  # "4bit" | "mid"
    options: dict = attrs.Factory(dict)
    match_evals: str | None = None  # max_trials = this search row's number of evaluations
    parent: str | None = None  # the search row this one ablates or repeats (findings compare the two)
    repeat: bool = False  # the parent search again with another search seed (compared with uniform, too)
    emb_bits: int = 16  # bits of the token embedding / output head units ("uniform" and "rule" rows)
    store: str | None = None  # the search store's file name (None: one per search seed, guidance, ranks, budget)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits`` (``llama-quant.cpp``, Q4_K_M's rule for ``attn_v`` / ``ffn_down``): block ``i``
    of ``n`` gets the higher type when it lies in the first or last eighth, or every third block in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fixed_assignment(space, bits: int, rank: int, emb_bits: int = 16, rule_bits: int | None = None):
    """Every block at ``bits`` / ``rank`` (blocks :func:`use_more_bits` favours at ``rule_bits`` when given), every
    embedding / head unit of ``space`` at ``emb_bits`` (no rank): the harness's "uniform" and "rule" rows."""
    blocks = [i for i, u in enumerate(space.units) if u.has_rank]
    bset, rset = [], []
    for i, u in enumerate(space.units):
        if not u.has_rank:
            bset.append(emb_bits)
            rset.append(0)
            continue
        k = blocks.index(i)
        bset.append(rule_bits if rule_bits is not None and use_more_bits(k, len(blocks)) else bits)
        rset.append(rank)
    return space.make(bset, rset)


_NO_PRIORS, _NO_SURR, _NO_P2 = {"importance_blocks": 0}, {"use_surrogate": False}, {"phase2": None}
_PRIORS = {"guidance": "priors", "phase2": "turbo"}  # the landed search: importance priors, paper operators
_EQ6, _ANCHORED = {"warm_start": "eq6", **_PRIORS}, {"warm_start": "anchored", **_PRIORS}
_DEFAULT = {"ranks": [4, 8, 16]}  # OptimizeConfig's default ladder (the preset's (0, 4, 8, 16) is the earlier rows')
ROWS: tuple[RowSpec, ...] = (
    RowSpec("lora16-r8", "16-bit LoRA r8", "uniform", bits=16, rank=8),
    RowSpec("lora16-r16", "16-bit LoRA r16", "uniform", bits=16, rank=16),
    RowSpec("hqq8-r8", "uniform 8-bit HQQ r8", "uniform", bits=8, rank=8),
    RowSpec("hqq4-r8", "uniform 4-bit HQQ r8", "uniform", bits=4, rank=8),
    RowSpec("hqq4-r16", "uniform 4-bit HQQ r16", "uniform", bits=4, rank=16),
    RowSpec("nf4-r8", "uniform 4-bit bnb nf4 r8", "uniform", backend="bnb", bits=4, rank=8),
    RowSpec("nf4-r16", "uniform 4-bit bnb nf4 r16", "uniform", backend="bnb", bits=4, rank=16),
    RowSpec("hqq3-r8", "uniform 3-bit HQQ r8", "uniform", bits=3, rank=8),
    # the embedding / output head as units (issue 23): fixed points that spend their bytes
    RowSpec("hqq4-r8-emb8", "uniform 4-bit HQQ r8, 8-bit embedding/head", "uniform", bits=4, rank=8, emb_bits=8),
    RowSpec("hqq4-r8-emb4", "uniform 4-bit HQQ r8, 4-bit embedding/head", "uniform", bits=4, rank=8, emb_bits=4),
    RowSpec("rule-emb8", "rule: 8-bit embedding/head, 8 bits on llama.cpp's use_more_bits blocks, 4 elsewhere, r8",
            "rule", bits=4, rank=8, emb_bits=8),
    # the paper's method (Eq. 6 warm start); the ablations below remove one piece of it
    RowSpec("autoqra", "AutoQRA, paper Eq. 6 warm start (≤ B4)", "search", options=_EQ6),
    RowSpec("autoqra-mid", "AutoQRA, paper Eq. 6 warm start (≤ Bmid)", "search", budget="mid", options=_EQ6),
    RowSpec("random", "random search (≤ B4)", "random", parent="guided"),
    RowSpec("no-priors", "ablation: no priors (≤ B4)", "search", options={**_EQ6, **_NO_PRIORS}, parent="autoqra"),
    RowSpec("no-surrogate", "ablation: no surrogate (≤ B4)", "search", options={**_EQ6, **_NO_SURR},
            match_evals="autoqra", parent="autoqra"),
    RowSpec("no-phase2", "ablation: no Phase II (≤ B4)", "search", options={**_EQ6, **_NO_P2}, parent="autoqra"),
    RowSpec("nsga2", "plain NSGA-II (≤ B4)", "search",
            options={"warm_start": "none", **_PRIORS, **_NO_PRIORS, **_NO_SURR, **_NO_P2}, match_evals="autoqra",
            parent="autoqra"),
    # autoqra's default: the cost-model-guided search (autoqra.guidance.costmodel), two search seeds
    RowSpec("guided", "AutoQRA cost-guided, ranks 0/4/8/16 (≤ B4)", "search"),
    RowSpec("guided-mid", "AutoQRA cost-guided, ranks 0/4/8/16 (≤ Bmid)", "search", budget="mid"),
    RowSpec("guided-s1", "AutoQRA cost-guided, ranks 0/4/8/16, search seed 1 (≤ B4)", "search", options={"seed": 1},
            parent="guided", repeat=True),
    RowSpec("guided-mid-s1", "AutoQRA cost-guided, ranks 0/4/8/16, search seed 1 (≤ Bmid)", "search", budget="mid",
            options={"seed": 1}, parent="guided-mid", repeat=True),
    # the default with no rank 0 in the ladder: every block keeps an adapter (the cost model's leave-one-out
    # rank gains left 11 blocks without one, and uniform 4-bit r8 beat that choice after the final training)
    RowSpec("guided-adapted", "AutoQRA cost-guided, an adapter on every block (ranks 4/8/16, ≤ B4)", "search",
            options={"ranks": [4, 8, 16]}, parent="guided"),
    RowSpec("guided-mid-adapted", "AutoQRA cost-guided, an adapter on every block (ranks 4/8/16, ≤ Bmid)", "search",
            budget="mid", options={"ranks": [4, 8, 16]}, parent="guided-mid"),
    # today's default (ranks 4/8/16, the embedding / head as units, the final rung), two search seeds; the rows
    # "guided*" above ran before these were the default (ranks 0/4/8/16, 30-step top rung, no final rung)
    RowSpec("default", "AutoQRA default: final rung, embedding/head units, ranks 4/8/16 (≤ B4)", "search",
            options=_DEFAULT, store="default-s0-4bit.db"),
    RowSpec("default-mid", "AutoQRA default: final rung, embedding/head units, ranks 4/8/16 (≤ Bmid)", "search",
            budget="mid", options=_DEFAULT, store="default-s0-mid.db"),
    RowSpec("default-s1", "AutoQRA default, search seed 1 (≤ B4)", "search", options={**_DEFAULT, "seed": 1},
            parent="default", repeat=True, store="default-s1-4bit.db"),
    RowSpec("default-mid-s1", "AutoQRA default, search seed 1 (≤ Bmid)", "search", budget="mid",
            options={**_DEFAULT, "seed": 1}, parent="default-mid", repeat=True, store="default-s1-mid.db"),
    # the previous default: priors-guided, Phase I seeded at the highest uniform bit-width the budget affords
    RowSpec("autoqra-anchored", "AutoQRA, anchored warm start, priors-guided (≤ B4)", "search", options=_ANCHORED),
    RowSpec("autoqra-mid-anchored", "AutoQRA, anchored warm start, priors-guided (≤ Bmid)", "search", budget="mid",
            options=_ANCHORED),
    # the same ablations of the default (anchored) search
    RowSpec("anchored-no-priors", "ablation of the default: no priors (≤ B4)", "search",
            options={**_ANCHORED, **_NO_PRIORS}, parent="autoqra-anchored"),
    RowSpec("anchored-no-surrogate", "ablation of the default: no surrogate (≤ B4)", "search",
            options={**_ANCHORED, **_NO_SURR}, match_evals="autoqra-anchored", parent="autoqra-anchored"),
    RowSpec("anchored-no-phase2", "ablation of the default: no Phase II (≤ B4)", "search",
            options={**_ANCHORED, **_NO_P2}, parent="autoqra-anchored"),
    # the default search again with another search seed (its own baselines, data order and GA draws)
    RowSpec("autoqra-anchored-s1", "AutoQRA, anchored warm start, priors-guided, search seed 1 (≤ B4)", "search",
            options={**_ANCHORED, "seed": 1}, parent="autoqra-anchored", repeat=True),
    RowSpec("autoqra-mid-anchored-s1", "AutoQRA, anchored warm start, priors-guided, search seed 1 (≤ Bmid)",
            "search", budget="mid", options={**_ANCHORED, "seed": 1}, parent="autoqra-mid-anchored", repeat=True),
)
