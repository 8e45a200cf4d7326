r"""Command line: ``autoqra memory | optimize | train | export | report | bench``.

Every command takes ``--plugin MODULE`` (repeatable): a module imported before the command runs, so the
evaluators, executors, searchers and backends it registers are selectable by name (``--evaluator``,
``--executor``, ``--phase1`` / ``--phase2``, ``--backend``, or the ``--config`` file).

This module stays light: the command modules (and through them torch, peft and bitsandbytes) are imported
only after :func:`quiet_libraries` has run, because some libraries talk when they are imported (bitsandbytes
logs a missing optional kernel on AVX512-BF16 CPUs as soon as peft imports it).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    import autoqra.cli.artifact as cli_artifact
    import autoqra.cli.bench as cli_bench
    import autoqra.cli.memory as cli_memory
    import autoqra.cli.optimize as cli_optimize
    import autoqra.cli.report as cli_report

    p = argparse.ArgumentParser(prog="autoqra", description="Joint quantization-bit / LoRA-rank search under a memory budget.")
    add_verbosity(p)
    sub = p.add_subparsers(dest="command", required=True)
    for mod in (cli_memory, cli_optimize, cli_artifact, cli_report, cli_bench):
        mod.add_commands(sub)
    for cmd in sub.choices.values():  # also after the command: `autoqra optimize -q ...`
        add_verbosity(cmd, inner=True)
        add_plugin_option(cmd)
    return p


def add_plugin_option(p: argparse.ArgumentParser) -> None:
    """``--plugin MODULE`` (repeatable): import a module that registers plug-ins before the command runs."""
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (a dotted module name, found from the current directory too, or a "
                        "path to a .py file; repeatable): the evaluators, executors, searchers and backends it "
                        "registers (@register_evaluator, @register_executor, @register_searcher, "
                        "@register_backend) can then be chosen by name")


def load_plugins(specs: Sequence[str]) -> list:
    """Import each plug-in module of ``specs`` (dotted names or ``.py`` paths) and return the modules.

    Raises:
        FileNotFoundError: a ``.py`` path that does not exist.
        ImportError: a module that cannot be imported (the message names the ``--plugin`` value).
    """
    mods = []
    for spec in specs:
        if spec.endswith(".py") or os.sep in spec or "/" in spec:
            path = Path(spec).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"--plugin {spec}: no such file")
            name = f"autoqra_plugin_{path.stem}"
            mod = sys.modules.get(name)
            if mod is None or getattr(mod, "__file__", None) != str(path):
                loader_spec = importlib.util.spec_from_file_location(name, path)
                if loader_spec is None or loader_spec.loader is None:
                    raise ImportError(f"--plugin {spec}: not an importable Python file")
                mod = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = mod
                try:
                    loader_spec.loader.exec_module(mod)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            if os.getcwd() not in sys.path:  # a module beside the user, as with `python -m`
                sys.path.append(os.getcwd())
            try:
                mod = importlib.import_module(spec)
            except ModuleNotFoundError as e:
                if e.name is not None and (spec == e.name or spec.startswith(e.name + ".")):
                    raise ImportError(f"--plugin {spec}: no module named {e.name!r} (give a dotted module name "
                                      "importable here, or a path to a .py file)") from e
                raise
        mods.append(mod)
    return mods


def add_verbosity(p: argparse.ArgumentParser, inner: bool = False) -> None:
    """``-q`` / ``-v`` (``inner``: on a sub-command, where an absent flag must not reset the one given before it)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS if inner else 0,
                   help="-v: also autoqra's own log messages (library detail) and third-party warnings; "
                        "-vv: debug logging of everything")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS if inner else False,
                   help="no progress (neither the live view nor the progress lines); results and errors still print")


#: Library messages a command-line user cannot act on (each checked against the library that prints it).
_NOISE = (
    r".*is_gradient_checkpointing.*",  # transformers 5 deprecation inside its own code
    r"Converting a tensor with requires_grad=True to a scalar",
    r"Unsupported layer type",  # peft, for layers it wraps through a custom mapping
)


def quiet_libraries() -> None:
    """Silence third-party warnings and progress bars that say nothing to a user (``-v`` keeps them)."""
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    # bitsandbytes logs (not warns) its missing optional kernel when it is imported, on AVX512-BF16 CPUs
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # ...and, through it, the `kernels` package says it skipped a trust check when the Hub is offline
    logging.getLogger("kernels").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def shows_progress(args: argparse.Namespace) -> bool:
    """Progress is shown unless ``--no-progress`` or ``-q``: a live view on a terminal, plain lines on stderr
    otherwise (log files, nohup, CI)."""
    return not (getattr(args, "no_progress", False) or getattr(args, "quiet", False))


def _wants_verbose(argv: Sequence[str]) -> bool:
    """``-v``/``--verbose`` (or ``-vv``) anywhere on the command line (read before anything heavy is imported)."""
    return any(a == "--verbose" or (a.startswith("-v") and set(a[1:]) == {"v"}) for a in argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not _wants_verbose(argv):
        quiet_libraries()
    args = build_parser().parse_args(argv)
    # progress lines do not go through logging (autoqra.progress writes them to stderr unless -q); -v adds the
    # library's own INFO messages, -vv everything at DEBUG
    verbose = int(getattr(args, "verbose", 0) or 0)
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("autoqra").setLevel(logging.INFO if verbose == 1 else logging.NOTSET)
    try:
        load_plugins(getattr(args, "plugin", None) or [])
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as e:
        from rich.console import Console

        Console(stderr=True).print(f"[red]error:[/red] {e}")
        return 2

