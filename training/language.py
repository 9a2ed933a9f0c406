"""Training the language model on the cached training sequences: loss on the answers, batches of one kind, cosine
learning rate, the constructed entries kept as they are."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from training.forward import IGNORE, Item, collate, text_logits
from training.model import frozen_masks


def lm_batch(model, items: Sequence[Item], pad_id: int) -> tuple[torch.Tensor, dict]:
    """Loss (mean over answer tokens and <|im_end|>) of a batch of items."""
    ids, pos, valid, target, lse, value = collate(items, pad_id)
    logits = text_logits(model, ids, pos, valid, lse, value)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)
    with torch.no_grad():
        ok = target != IGNORE
        exact = ((logits.argmax(-1) == target) | ~ok).all(-1).float().mean()
    return loss, {"loss": float(loss.detach()), "exact": float(exact)}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """The learning rate at `step`: linear warm-up to `peak`, then a cosine to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


KIND_WEIGHTS = {"image": 0.6, "pair": 0.2, "video": 0.2}  # share of the batches of each kind


def train_language(model, items: Sequence[Item], *, steps: int, lr: float, seed: int, log, pad_id: int,
                   batch_size: int = 64, deadline: float | None = None) -> None:
    """The language model (all but the constructed entries) on the items, batches of one kind drawn with
    KIND_WEIGHTS, cosine learning rate."""
    gen = np.random.default_rng([seed, 11])
    by_kind = defaultdict(list)
    for it in items:
        by_kind[it.kind].append(it)
    kinds = sorted(by_kind)
    p = np.asarray([KIND_WEIGHTS[k] for k in kinds])
    named = dict(model.named_parameters())
    params = [p_ for n, p_ in named.items() if n.startswith(("model.language_model.", "lm_head."))]
    masks = {named[n]: ~m for n, m in frozen_masks(model).items()}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    frozen_values = {p_: p_.detach().clone() for p_ in masks}
    model.train()
    start = time.time()
    stats = defaultdict(lambda: defaultdict(list))
    order = {k: gen.permutation(len(v)) for k, v in by_kind.items()}
    cursor = dict.fromkeys(kinds, 0)
    for step in range(steps):
        if deadline is not None and time.time() > deadline:
            log(f"  stopping at the time limit, step {step}/{steps}")
            break
        kind = kinds[int(gen.choice(len(kinds), p=p / p.sum()))]
        pool = by_kind[kind]
        if cursor[kind] + batch_size > len(pool):
            order[kind], cursor[kind] = gen.permutation(len(pool)), 0
        batch = [pool[j] for j in order[kind][cursor[kind]:cursor[kind] + batch_size]]
        cursor[kind] += batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=max(10, steps // 30))
        loss, info = lm_batch(model, batch, pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p_, keep in masks.items():
            if p_.grad is not None:
                p_.grad.mul_(keep)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for p_, keep in masks.items():  # AdamW's momentum never moves the constructed entries
                p_.copy_(torch.where(keep, p_, frozen_values[p_]))
        for k, v in info.items():
            stats[kind][k].append(v)
        if (step + 1) % 250 == 0 or step == steps - 1:
            parts = [f"{kind}:loss={np.mean(v['loss'][-30:]):.3f},exact={np.mean(v['exact'][-30:]):.2f}"
                     for kind, v in sorted(stats.items())]
            log(f"  language step {step + 1}/{steps} " + " ".join(parts) + f" ({time.time() - start:.0f}s)")
    model.eval()
