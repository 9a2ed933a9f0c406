"""The encoder's one trained part: layer 4's MLP, the shape classifier on the constructed features A and B."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from training import seeing as S
from training.samples import Sample


def train_shape_head(model, samples: Sequence[Sample], *, seed: int, steps: int, log) -> None:
    """Layer 4's MLP: A and B of a tile that shows a whole shape -> shape logits (C_SHAPE..+3). Inputs are
    standardised inside fc1 (the standardisation folded into its weights)."""
    xs, ys = [], []
    for s in samples:
        for tile, label in s.shape_tiles:
            xs.append(s.features[tile, S.CLASSIFIER_FEATURES])
            ys.append(label)
    x = torch.stack(xs).double()
    y = torch.tensor(ys)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xn = ((x - mu) / sd).float()
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(xn.shape[1], S.MLP), torch.nn.GELU(), torch.nn.Linear(S.MLP, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.0))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    n = len(xn)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits at every barrier
    for step in range(steps):
        idx = torch.randint(0, n, (256,), generator=gen)
        loss = F.cross_entropy(net(xn[idx]), y[idx])
        for g in opt.param_groups:
            g["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    with torch.no_grad():
        acc = float((net(xn).argmax(-1) == y).float().mean())
    log(f"  shape classifier: {n} tiles, train accuracy {acc:.4f}")
    mlp = model.model.vision_tower.encoder.layer[3].mlp
    with torch.no_grad():
        w1 = net[0].weight.double() / sd[None, :]
        b1 = net[0].bias.double() - (w1 * mu[None, :]).sum(1)
        mlp.fc1.weight.zero_()
        mlp.fc1.weight[:, S.CLASSIFIER_INPUTS] = w1.float()
        mlp.fc1.bias.copy_(b1.float())
        mlp.fc2.weight.zero_()
        mlp.fc2.bias.zero_()
        mlp.fc2.weight[S.C_SHAPE:S.C_SHAPE + 3] = net[2].weight
        mlp.fc2.bias[S.C_SHAPE:S.C_SHAPE + 3] = net[2].bias


@torch.no_grad()
def shape_logits(model, inputs: torch.Tensor) -> torch.Tensor:
    """Layer 4's MLP on (N, 2) A, B -> (N, 3): the same arithmetic as the encoder."""
    mlp = model.model.vision_tower.encoder.layer[3].mlp
    w1 = mlp.fc1.weight[:, S.CLASSIFIER_INPUTS]
    h = F.gelu(inputs @ w1.T + mlp.fc1.bias)
    return h @ mlp.fc2.weight[S.C_SHAPE:S.C_SHAPE + 3].T + mlp.fc2.bias[S.C_SHAPE:S.C_SHAPE + 3]


def full_features(model, features: torch.Tensor) -> torch.Tensor:
    """(N, 11) fast features + the classifier's logits -> (N, 14), the order of seeing.GLOBAL_CHANNELS."""
    return torch.cat([features, shape_logits(model, features[:, S.CLASSIFIER_FEATURES])], dim=-1)
