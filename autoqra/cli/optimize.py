r"""CLI sub-commands that run searches and use their results: ``optimize``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console

from autoqra import models
from autoqra.api import optimize
from autoqra.cli.main import shows_progress
from autoqra.config import OptimizeConfig
from autoqra.precision import compute_dtype, resolve_device, resolve_precision
from autoqra.unit_types import GRANULARITIES

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the search-related sub-commands."""
    o = sub.add_parser("optimize", help="search per-unit bits and LoRA ranks under a memory budget")
    o.add_argument("--config", help="YAML/JSON file with OptimizeConfig fields (flags override it)")
    o.add_argument("--model", default="default", help="'default' (SmolLM2), 'tiny', or a local HF directory")
    o.add_argument("--budget", help="bytes, '3.5GB', '900MiB', or a reference like '4bit' (default 4bit)")
    o.add_argument("--backend", help="a registered backend: hqq (default) | bnb | gptq | none | a plug-in's (--plugin)")
    o.add_argument("--evaluator", help="a registered evaluator: finetune (default) | lm_eval | a plug-in's (--plugin)")
    o.add_argument("--phase1", help="Phase I searcher: nsga2 (default) | random | ... | a plug-in's (--plugin)")
    ph2 = o.add_mutually_exclusive_group()
    ph2.add_argument("--phase2", help="Phase II searcher: local (default) | turbo | ax | ... | a plug-in's (--plugin)")
    ph2.add_argument("--no-phase2", action="store_true", help="skip Phase II")
    o.add_argument("--preset", help="demo (~15 min on 2 cores) | tiny | default")
    o.add_argument("--bits", type=int, nargs="+",
                   help="bit ladder (default: the backend's subset of 2 3 4 8, e.g. 4 8 on bnb)")
    o.add_argument("--ranks", type=int, nargs="+", help="rank ladder (default 4 8 16: an adapter on every block; add 0 to allow none)")
    o.add_argument("--granularity", choices=list(GRANULARITIES))
    o.add_argument("--embeddings", choices=["search", "keep"],
                   help="search: the token embedding / output head are units (16/8/4 bits, no rank; default); "
                        "keep: 16-bit, outside the space (the paper's)")
    o.add_argument("--formats", choices=["choose", "fixed"],
                   help="choose: measure each bit-width's group size for this model first (default; hqq); "
                        "fixed: the backend's")
    o.add_argument("--target", choices=["model", "train"], help="budget on model bytes or training bytes")
    o.add_argument("--data", help="'pydoc' (embedded) or a JSONL file")
    o.add_argument("--max-trials", type=int)
    o.add_argument("--time-limit", type=float, help="seconds")
    o.add_argument("--seed", type=int)
    o.add_argument("--no-final-rung", action="store_true",
                   help="choose on the top rung's score instead of training the finalists and the fitting uniform "
                        "baselines with the final recipe (the previous behaviour; an ablation)")
    o.add_argument("--final-candidates", type=int, help="search candidates in the final rung (default: 2 in the demo preset, 3 otherwise)")
    o.add_argument("--rung-schedule", choices=["wsd", "constant"],
                   help="rungs end with a short decay (wsd, default) or are scored at the constant rate")
    o.add_argument("--warm-start", choices=["eq6", "anchored", "none"],
                   help="Phase I seed: anchored (default: highest uniform bit-width that fits, slack filled "
                        "by importance per byte) | eq6 (the paper's, from the priors) | none (random)")
    add_device_options(o)
    o.add_argument("--executor", help="local (default: one trial at a time) | ray | a plug-in's (--plugin)")
    o.add_argument("--ray-address", help="existing Ray cluster: 'auto' (after `ray start --head`) or ray://host:10001")
    o.add_argument("--workers", type=int, help="Ray workers = trials at once (default: as many as fit)")
    o.add_argument("--worker-gpus", type=float, help="GPUs per Ray worker (default 1 when the cluster has GPUs)")
    o.add_argument("--worker-cpus", type=float, help="CPUs per Ray worker (default 1 without GPUs)")
    o.add_argument("--phase2-batch", type=int, help="Phase II points per ask (default: the number of workers)")
    o.add_argument("--out", default="runs/autoqra",
                   help="run directory: trials.db (resumable store) and result.json (default runs/autoqra)")
    o.add_argument("--no-progress", action="store_true",
                   help="no progress: neither the live view (terminal) nor the progress lines on stderr (as -q)")
    o.add_argument("--no-report", action="store_true", help="do not write <out>/report (PNG plots + report.html)")
    o.set_defaults(func=cmd_optimize)


def add_device_options(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--precision`` (shared by the commands that train)."""
    p.add_argument("--device", help="where to train: auto (a GPU when visible; default), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="training precision (default auto: bf16 where the GPU/CPU computes it natively, "
                        "fp16 on older GPUs, else fp32); the model is loaded in it")


def load_for_training(name: str, device: str | None, precision: str | None):
    """``(model, tokenizer, device, precision)``: the model loaded in the precision's dtype on the device."""
    dev = resolve_device(device or "auto")
    prec = resolve_precision(precision or "auto", dev)
    model, tok = models.load_model(name, dtype=compute_dtype(prec), device=dev)
    return model, tok, str(dev), prec


def _executor_options(args: argparse.Namespace) -> dict:
    """OptimizeConfig executor fields given on the command line."""
    opts = {k: getattr(args, k, None) for k in ("executor", "ray_address", "workers", "phase2_batch")}
    res = {k: v for k, v in (("num_gpus", getattr(args, "worker_gpus", None)),
                             ("num_cpus", getattr(args, "worker_cpus", None))) if v is not None}
    if res:
        opts["worker_resources"] = res
    return {k: v for k, v in opts.items() if v is not None}


def _search_options(args: argparse.Namespace) -> dict:
    """OptimizeConfig fields given on the command line (besides device and precision)."""
    options = {
        k: getattr(args, k) for k in ("budget", "evaluator", "phase1", "phase2", "preset", "bits", "ranks",
                                      "granularity", "target", "data", "warm_start", "embeddings", "formats")
        if getattr(args, k, None) is not None
    }
    if args.no_phase2:
        options["phase2"] = None
    if args.no_final_rung:
        options["final_rung"] = False
    options.update({k: v for k in ("final_candidates", "rung_schedule") if (v := getattr(args, k)) is not None})
    options.update(_executor_options(args))
    return options


def cmd_optimize(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    file_cfg = OptimizeConfig.from_file(args.config) if args.config else OptimizeConfig()
    options = _search_options(args)
    given = {k: v for k, v in (("backend", args.backend), ("max_trials", args.max_trials),
                               ("time_limit", args.time_limit), ("seed", args.seed)) if v is not None}
    # names (evaluator, executor, searchers, backend) and values are checked before the model loads
    OptimizeConfig.from_dict({**file_cfg.to_dict(), **given, **options})
    model, tok, device, precision = load_for_training(args.model, args.device or file_cfg.device,
                                                      args.precision or file_cfg.precision)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options.update(device=device, precision=precision)
    console.print(f"[bold]autoqra optimize[/bold] · model {args.model} ({precision} on {device}) · run dir {out} "
                  "(re-run to resume)")
    res = optimize(
        model, tokenizer=tok, backend=args.backend, max_trials=args.max_trials, time_limit=args.time_limit,
        store=out / "trials.db", seed=args.seed, config=args.config, progress=shows_progress(args), **options,
    )
    path = res.save(out)
    console.print(res.summary())
    info = res.info
    console.print(f"evaluations: {info['n_evals']} ({info['n_run']} run now) · wall {info['wall_seconds']:.0f} s · "
                  f"stop: {info['stop_reasons']}{' · ' + info['stopped'] if info.get('stopped') else ''}")
    console.print(f"result written to {path}")
    if not args.no_report:
        console.print(f"report written to {res.report(out / 'report')}")
    console.print(f"next: autoqra train --run {out}  (full-fidelity fine-tune), then autoqra export --run {out} --out DIR")
    return 0 if res.best is not None else 1

