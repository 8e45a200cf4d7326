r"""The checks :class:`~autoqra.config.OptimizeConfig` and :class:`~autoqra.train_spec.TrainSpec` run on their fields
(attrs validators: each bad value raises one ``ValueError`` naming field, value and what is allowed), the plug-in
registries a name is checked against, the executor fields' rules, and reading a YAML / JSON config file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import yaml


def _positive(inst: Any, att: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{att.name}={value!r} is not allowed; it must be a positive number")


def _non_negative(inst: Any, att: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{att.name}={value!r} is not allowed; it must be >= 0")


def _bool(inst: Any, att: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{att.name}={value!r} is not allowed; it must be True or False")


def _one_of(*allowed: Any):
    def check(inst: Any, att: attrs.Attribute, value: Any) -> None:
        if value not in allowed:
            raise ValueError(f"{att.name}={value!r} is not allowed; choose one of {list(allowed)}")

    return check


#: How a plug-in's name becomes known (said when a name is not registered).
_PLUGIN_HINT = ("a plug-in registers its name when its module is imported: import it first (on the command line: "
                "--plugin MODULE)")


def registry_for(kind: str) -> Any:
    """The registry of a plug-in kind (``"backend"``, ``"evaluator"``, ``"executor"``, ``"searcher"``), with its
    built-ins registered (imported here, not at the top: those packages import this module)."""
    if kind == "backend":
        from autoqra.quant_backends import BACKENDS as reg
    elif kind == "evaluator":
        from autoqra.evaluators import EVALUATORS as reg
    elif kind == "executor":
        from autoqra.executors import EXECUTORS as reg
    elif kind == "searcher":
        from autoqra.searchers import SEARCHERS as reg
    else:
        raise ValueError(f"unknown plug-in kind {kind!r}")
    return reg


def _registered(kind: str, optional: bool = False):
    """Validator: the value names a registered ``kind`` (``None`` too where ``optional``)."""

    def check(inst: Any, att: attrs.Attribute, value: Any) -> None:
        if value is None and optional:
            return
        reg = registry_for(kind)
        if not isinstance(value, str) or value not in reg:
            raise ValueError(f"{att.name}={value!r} is not a registered {kind}; registered {kind}s: {reg.names()}"
                             + (" or None" if optional else "") + f"; {_PLUGIN_HINT}")

    return check


def _probability(inst: Any, att: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{att.name}={value!r} is not allowed; it must be in [0, 1)")


def _known(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    names = {a.name for a in attrs.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; allowed: {sorted(names)}")
    return dict(d)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (safe loaders only)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping at top level, got {type(data).__name__}")
    return data


def _opt_positive_int(inst: Any, att: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{att.name}={value!r} is not allowed; it must be a positive integer or None")


def _opt_non_negative_int(inst: Any, att: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{att.name}={value!r} is not allowed; it must be an integer >= 0 or None")


def _opt_positive(inst: Any, att: attrs.Attribute, value: Any) -> None:
    if value is not None:
        _positive(inst, att, value)


def _int_tuple(v: Any) -> tuple[int, ...]:
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise ValueError(f"expected a list of integers, got {v!r}")
    return tuple(int(x) for x in v)


WORKER_RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")


#: Executor fields of the config and the executor constructor parameter each one is passed as.
_EXECUTOR_PARAMS = (("ray_address", "address"), ("workers", "workers"), ("worker_resources", "resources"))


def _check_executor(cfg: Any) -> None:
    """Executor fields: ray options only with executor="ray"; worker_resources are Ray actor options; a plug-in
    executor is given only the fields its constructor takes (``address``, ``workers``, ``resources``)."""
    if cfg.executor not in ("local", "ray"):
        from autoqra.registry import accepted_names

        takes = accepted_names(registry_for("executor").get(cfg.executor), skip=1)
        for field, param in _EXECUTOR_PARAMS:
            given = getattr(cfg, field)
            if given not in (None, {}) and takes is not None and param not in takes:
                raise ValueError(f"{field}={given!r} is not allowed with executor={cfg.executor!r}: its constructor "
                                 f"does not take {param!r} (it takes {sorted(takes)})")
    if cfg.executor == "local":
        for name, bad in (("ray_address", cfg.ray_address is not None), ("workers", (cfg.workers or 1) > 1),
                          ("worker_resources", bool(cfg.worker_resources))):
            if bad:
                raise ValueError(f"{name}={getattr(cfg, name)!r} is not allowed with executor='local' (one trial at "
                                 "a time in this process); use executor='ray' (phase2_batch sets the batch size)")
    if cfg.ray_address is not None and (not isinstance(cfg.ray_address, str) or not cfg.ray_address):
        raise ValueError(f"ray_address={cfg.ray_address!r} is not allowed; it must be a non-empty string or None")
    if not isinstance(cfg.worker_resources, dict):
        raise ValueError(f"worker_resources={cfg.worker_resources!r} is not allowed; it must be a dict of Ray "
                         f"actor options {list(WORKER_RESOURCE_KEYS)}")
    for k, v in cfg.worker_resources.items():
        if k not in WORKER_RESOURCE_KEYS:
            raise ValueError(f"worker_resources key {k!r} is not allowed; choose from {list(WORKER_RESOURCE_KEYS)}")
        if k in ("num_cpus", "num_gpus", "memory") and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise ValueError(f"worker_resources[{k!r}]={v!r} is not allowed; it must be a number >= 0")
