"""Shared test helpers: per-backend ladders and a training step."""

import torch

from autoqra.quant_backends import get_backend

LADDERS = {"none": (16,), "hqq": (2, 3, 4, 8, 16), "bnb": (4, 8, 16), "gptq": (2, 3, 4, 8, 16)}
BACKENDS = tuple(LADDERS)


def calib_for(backend, vocab, n=4, seq=32, seed=0):
    if not get_backend(backend).needs_calibration:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g)


def train_step(model, vocab, batch=2, seq=32, seed=0):
    """One AdamW step on random tokens; returns the optimizer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return opt, loss.item()
