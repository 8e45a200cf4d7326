r"""CLI sub-commands that turn a search result into a model: ``train`` and ``export``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from autoqra.checkpoints import read_state
from autoqra.cli.main import shows_progress
from autoqra.models import load_model
from autoqra.result import load_result


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``export``."""
    t = sub.add_parser("train", help="fine-tune the chosen point of a run at full fidelity (resumable)")
    _common(t)
    g = t.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="optimizer steps (default: the run's final_steps)")
    g.add_argument("--epochs", type=float, help="epochs over the training split instead of --steps")
    t.add_argument("--checkpoint-every", type=int, default=25, help="optimizer steps between checkpoints")
    t.add_argument("--seed", type=int, help="training seed (default: the search's)")
    t.add_argument("--no-progress", action="store_true",
                   help="no progress: neither the bar (terminal) nor the step lines on stderr (as -q)")
    t.add_argument("--device", help="where to train (default: the search's device when available, else cpu)")
    t.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="training precision (default: the search's)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="write the trained model (quantized base + adapter) as a loadable folder")
    _common(e)
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--merge", action="store_true",
                   help="fold the adapter into the base (16-bit layers exactly, HQQ layers by re-quantization)")
    e.set_defaults(func=cmd_export)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory of `autoqra optimize` (holds result.json)")
    p.add_argument("--index", type=int, help="use pareto[INDEX] instead of the chosen point")
    p.add_argument("--model", help="source model ('default', 'tiny' or a directory) if the run does not record it")


def _load(args: argparse.Namespace):
    res = load_result(args.run)
    model = tok = None
    if args.model:
        model, tok = load_model(args.model, dtype=res.info.get("model_dtype") or "float32")
    return res, model, tok


def _ckpt_dir(res, index: int | None) -> Path:
    return res.run_dir / ("final" if index is None else f"final-{index}")


def cmd_train(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    res, model, tok = _load(args)
    out = _ckpt_dir(res, args.index)
    console.print(f"[bold]autoqra train[/bold] · run {args.run} · checkpoints in {out} (re-run to resume)")
    res.train(model, tokenizer=tok, index=args.index, steps=args.steps, epochs=args.epochs, out=out,
              checkpoint_every=args.checkpoint_every, seed=args.seed, progress=shows_progress(args),
              device=args.device, precision=args.precision)
    fm = res.final
    console.print(f"trained {fm.trial.assignment.short()} for {fm.steps} steps"
                  f"{f' (resumed at step {fm.resumed_from})' if fm.resumed_from else ''}: "
                  f"test loss {fm.metrics['test_loss']:.4f} (ppl {fm.metrics['test_ppl']:.2f}, "
                  f"next-token accuracy {fm.metrics['test_accuracy']:.3f})")
    console.print(f"export it with: autoqra export --run {args.run} --out <dir>")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    res, model, tok = _load(args)
    ck = _ckpt_dir(res, args.index)
    st = read_state(ck)
    if st is None or not st.get("complete"):
        raise ValueError(f"no finished final training in {ck}: run `autoqra train --run {args.run}` first")
    seed = (st.get("identity", {}).get("evaluator") or {}).get("seed")
    res.train(model, tokenizer=tok, index=args.index, steps=int(st["total_steps"]), out=ck, seed=seed, progress=False)
    path = res.export(args.out, merge=args.merge)
    console.print(f"exported to {Path(args.out)} ({path.name} describes it); load it with autoqra.load_artifact({str(args.out)!r})")
    info = json.loads(path.read_text())
    if "merge" in info:
        m = info["merge"]
        console.print(f"merged: test loss {m['loss_adapter']:.5f} with the adapter → {m['loss_merged']:.5f} merged "
                      f"({'exact' if m['exact'] else 're-quantized'}, Δ {m['delta']:+.5f})")
    return 0
