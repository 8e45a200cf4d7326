"""Quickstart: find per-layer bits and LoRA ranks for SmolLM2 under the uniform-4-bit memory budget.

    python examples/quickstart.py            # SmolLM2 + embedded data, ~15 min on 2 CPU cores
    python examples/quickstart.py --tiny     # tiny random Llama, ~1 min (what the test runs)
"""

import argparse

import autoqra


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="use the tiny test model")
    ap.add_argument("--out", default="runs/quickstart")
    args = ap.parse_args()
    if args.tiny:
        model, tok, preset = autoqra.models.tiny_llama(), None, "tiny"
        extra = {"train": autoqra.TrainSpec(batch_size=2, seq_len=32, lr=2e-3), "eval_blocks": 4}
    else:
        (model, tok), preset, extra = autoqra.models.load_default(), "demo", {}
    result = autoqra.optimize(model, budget="4bit", tokenizer=tok, backend="hqq", preset=preset,
                              store=f"{args.out}/trials.db", **extra)
    result.save(args.out)
    print(result.summary())
    print("peft rank_pattern of the chosen point:", result.to_peft_config().rank_pattern)


if __name__ == "__main__":
    main()
