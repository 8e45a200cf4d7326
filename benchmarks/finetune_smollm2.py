"""SmolLM2 held-out loss before/after a short fine-tune at 16-bit, uniform 4-bit and uniform 3-bit (HQQ),
and seconds per candidate at each fidelity.

Run: .venv/bin/python benchmarks/finetune_smollm2.py [--steps 20]  → benchmarks/results/finetune_smollm2.json
"""

import argparse
import json
from pathlib import Path

import autoqra
from autoqra.evaluators import Fidelity, FinetuneEvaluator
from autoqra.evaluators.data import build_task_data

OUT = Path(__file__).parent / "results" / "finetune_smollm2.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-blocks", type=int, default=32)
    args = ap.parse_args()
    model, tok = autoqra.models.load_default()
    train = autoqra.TrainSpec(batch_size=4, seq_len=128)
    data = build_task_data("pydoc", tok, block_size=128)
    space = autoqra.SearchSpace.from_model(model, bits=(3, 4, 16), ranks=(8,))
    ev = FinetuneEvaluator(model, space, "hqq", data=data, tokenizer=tok, train=train, eval_blocks=args.eval_blocks)
    rows = {}
    for bits in (16, 4, 3):
        a = space.uniform(bits, 8)
        before = ev.evaluate(a, Fidelity(0))
        after = ev.evaluate(a, Fidelity(args.steps))
        rows[f"{bits}-bit r8"] = {
            "loss_before": round(-before.score, 4), "loss_after": round(-after.score, 4),
            "seconds_0_steps": round(before.seconds, 1), f"seconds_{args.steps}_steps": round(after.seconds, 1),
            "model_bytes": after.memory["model_bytes"], "peak_step_bytes": after.memory["peak_bytes"],
        }
        print(bits, rows[f"{bits}-bit r8"], flush=True)
    out = {"steps": args.steps, "eval_blocks": args.eval_blocks, "train": train.to_dict(), "rows": rows}
    OUT.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
