"""``autoqra memory``: the exact memory breakdown of uniform assignments (a rich table or JSON)."""

from __future__ import annotations

import argparse
import json
import sys

from rich.table import Table

from autoqra import models
from autoqra.config import OptimizeConfig, TrainSpec
from autoqra.memory.model import MemoryBreakdown, MemoryModel
from autoqra.precision import precision_of
from autoqra.quant_backends import backend_for_precision
from autoqra.space import SearchSpace
from autoqra.unit_types import GRANULARITIES

_ROWS = [
    ("quantized weights", "quant_weight_bytes"),
    ("quant metadata", "quant_meta_bytes"),
    ("unquantized params/buffers", "unquantized_bytes"),
    ("LoRA parameters", "lora_bytes"),
    ("= model bytes", "model_bytes"),
    ("LoRA gradients", "lora_grad_bytes"),
    ("optimizer state", "optimizer_bytes"),
    ("activations (estimate)", "activation_bytes"),
    ("= train bytes", "train_bytes"),
]


def _mb(x: int) -> str:
    return f"{x / 1e6:,.2f} MB"


def breakdown_table(columns: dict[str, MemoryBreakdown], title: str = "memory"):
    """A rich table with one column per breakdown (bytes shown as MB, 1 MB = 10^6 bytes)."""
    table = Table(title=title)
    table.add_column("component")
    for name in columns:
        table.add_column(name, justify="right")
    dicts = {k: v.to_dict() for k, v in columns.items()}
    for label, field in _ROWS:
        table.add_row(label, *(_mb(d[field]) for d in dicts.values()), style="bold" if label[0] == "=" else None)
    return table


def _load_for_memory(args: argparse.Namespace):
    if args.model_config:
        return models.from_config(args.model_config, dtype=args.dtype)
    return models.load_model(args.model, dtype=args.dtype or "float32")[0]


def cmd_memory(args: argparse.Namespace) -> int:
    model = _load_for_memory(args)
    train = TrainSpec(batch_size=args.batch_size, seq_len=args.seq_len)
    precision = precision_of(next(model.parameters()).dtype)
    be = backend_for_precision(args.backend, precision)  # quantization metadata in the model's dtype
    bits_list = list(args.bits or OptimizeConfig().bits_for(be))  # default: the backend's subset of 2 3 4 8
    emb_bits = list(getattr(args, "embedding_bits", None) or [])
    space = SearchSpace.from_model(
        model, bits=sorted({*bits_list, 16, *emb_bits} if emb_bits else bits_list), ranks=sorted({0, args.rank}),
        granularity=args.granularity, target_modules=args.target_modules, backend=be,
        embeddings="search" if emb_bits else "keep",
    )
    mm = MemoryModel(model, space, be, train=train, precision=precision)
    cols = {f"{b}-bit r{args.rank}": mm.predict(space.uniform(b, args.rank)) for b in bits_list}
    own = {u.name: list(space.unit_bits(i)) for i, u in enumerate(space.units) if not u.has_rank}
    for e in emb_bits:  # the same uniform points with the embedding / head units at e bits
        if e == 16:
            continue
        bad = [n for n, opts in own.items() if e not in opts]
        if bad or not own:
            raise SystemExit(f"--embedding-bits {e}: backend {args.backend!r} stores the embedding / head "
                             f"units at {own or 'no bits (none found or all refused)'} only")
        for b in bits_list:
            u = space.uniform(b, args.rank)
            a = space.make([e if not unit.has_rank else x for unit, x in zip(space.units, u.bits)], u.ranks)
            cols[f"{b}-bit r{args.rank} emb{e}"] = mm.predict(a)
    if args.json:
        out = {"backend": mm.backend.spec(), "precision": precision, "train": train.to_dict(), "granularity": args.granularity,
               "n_units": space.n_units, "coverage": space.coverage.to_dict() if space.coverage else None,
               "breakdowns": {k: v.to_dict() for k, v in cols.items()},
               **({"embedding_options": own} if emb_bits else {})}
        json.dump(out, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        from rich.console import Console

        title = f"{args.model_config or args.model} · {precision} · backend {args.backend} · {space.n_units} units · batch {train.batch_size}×{train.seq_len}"
        console = Console()
        console.print(breakdown_table(cols, title))
        for name, opts in own.items():
            console.print(f"{name}: bit options {opts} (no rank)", markup=False)
        if space.coverage is not None:
            console.print(space.coverage.line(), markup=False)
            if space.coverage.warning():
                console.print("warning: " + space.coverage.warning(), style="yellow", markup=False)
    return 0


def add_commands(sub) -> None:
    m = sub.add_parser("memory", help="print the exact memory breakdown of uniform assignments")
    src = m.add_mutually_exclusive_group()
    src.add_argument("--model", default="default", help="'default' (SmolLM2), 'tiny', or a local HF directory")
    src.add_argument("--model-config", help="an HF config.json: plan memory on the meta device (no weights)")
    m.add_argument("--backend", default="hqq", help="hqq | bnb | gptq | none | a plug-in's (--plugin)")
    m.add_argument("--bits", type=int, nargs="+", help="bit-widths to tabulate (default: the backend's subset of 2 3 4 8; 16 = unquantized)")
    m.add_argument("--rank", type=int, default=8, help="LoRA rank of every unit (0 = none)")
    m.add_argument("--granularity", default="block", choices=list(GRANULARITIES))
    m.add_argument("--target-modules", nargs="+", help="narrow the space to these module names (default: every "
                   "weight matrix of the decoder blocks); the coverage line says what is left out")
    m.add_argument("--embedding-bits", type=int, nargs="+", help="also tabulate each uniform point with the token "
                   "embedding / output head units at these bits (e.g. 8 4; 16 = kept, the reference)")
    m.add_argument("--batch-size", type=int, default=4)
    m.add_argument("--seq-len", type=int, default=128)
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"],
                   help="dtype the model is loaded in (default: the config's torch_dtype for --model-config, "
                        "else fp32); quantization metadata and activations are planned in it too")
    m.set_defaults(func=cmd_memory)
