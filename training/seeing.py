"""The vision tower of the trained tiny InternVL: an InternViT-style encoder whose first two layers are set by hand.

A from-scratch ViT this small does not learn to tell shapes apart on 2 CPU cores in minutes (tried: it stays at
chance on circle/square/triangle while colours are learnt at once), so the features that make the world's answers
computable are constructed, in the real architecture and with its real operations, and only what reads them is
trained (the shape classifier in layer 3's MLP, the projector and the language model, in train_tiny.py):

- patch embedding (the 14 px conv): per patch a constant channel, the colour differences R-G and G-B of each of its
  4 x 4 sub-bins (3.5 px), the patch's mean RGB; absolute position embeddings hold the patch's position monomials
  (x^a y^b, a + b <= 4, in tile units) and a flag on the class token;
- layer 1 MLP: per sub-bin its chroma (max - min of RGB): the world's shapes are saturated colours (>= 0.35) on
  grey backgrounds (<= 0.1), so chroma says "shape" whatever the background;
- layer 2 attention: 16 heads, one per sub-bin position; head k attends to the patches whose sub-bin k is shape and
  averages the position monomials of that sub-bin's centre (and its colour); the heads' mean is the raw moments
  E[x^a y^b] of the shape at 3.5 px resolution, and its colour, broadcast to every token;
- layer 3 attention: one head averages the colour of the patches with no shape in them (the background);
- layer 3 MLP: trained: moments -> shape logits (the moment ratios that tell the shapes apart, e.g.
  mu22 / (mu20 mu02): 1 for a square, 2/3 for a disc, and the skew of a triangle, are invariant to the thumbnail's
  anisotropic squeeze).

Every LayerNorm-like step is an RMSNorm (the InternViT-6B kind) kept linear by a large constant channel.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.media.tiling import IMAGENET_MEAN, IMAGENET_STD, TILE_SIZE

PATCH = 14
SIDE = TILE_SIZE // PATCH  # 32 patches per side
BINS = 4  # sub-bins per patch side
BIN_EDGES = [(0, 4), (4, 7), (7, 11), (11, 14)]
HIDDEN = 256
HEADS = 16
HEAD_DIM = HIDDEN // HEADS
MLP = 256
BIG = 16000.0  # the constant channel; rms of a token ~ BIG / 16
RMS0 = BIG / np.sqrt(HIDDEN)

# position monomials x^a y^b with 1 <= a + b <= 4 (the patch origin, in tile units)
MONOMIALS = [(a, n - a) for n in range(1, 5) for a in range(n, -1, -1)]

# channel layout
C_ONE = 0
C_D1 = 1  # 16: R-G per sub-bin
C_D2 = C_D1 + 16  # 16: G-B per sub-bin
C_RGB = C_D2 + 16  # 3: patch mean RGB
C_POS = C_RGB + 3  # len(MONOMIALS)
C_CLS = C_POS + len(MONOMIALS)
C_S = C_CLS + 1  # 16: chroma of each sub-bin (layer 1)
C_CX = C_S + 16  # 2: the shape's centroid x, y (layer 2 attention)
C_COLOR = C_CX + 2  # 2: the shape's R-G, G-B (layer 2 attention)
C_DX2 = C_COLOR + 2  # 16: (x - cx)^2 per sub-bin (layer 2 MLP)
C_DY2 = C_DX2 + 16  # 16: (y - cy)^2
C_IN = C_DY2 + 16  # 16: sub-bin is shape, a step of its chroma (layer 2 MLP)
C_SX = C_IN + 16  # 2: the shape's variances along x, y (layer 3 attention)
C_BG = C_SX + 2  # 3: the background's RGB (layer 3 attention, last head)
C_I = C_BG + 3  # 4 x 16 indicators per sub-bin (layer 3 MLP): wide, below, far x, far y
C_AB = C_I + 64  # 2: A = P(below | wide), B = P(far y | far x) (layer 4 attention)
C_SHAPE = C_AB + 2  # 3 logits (layer 4 MLP)
C_END = C_SHAPE + 3
assert C_END <= HIDDEN

# the per-tile feature channels the projector passes to the language model (the same on every token of a tile):
# centroid, colour, background, variances, A, B, shape logits
GLOBAL_CHANNELS = [C_CX, C_CX + 1, C_COLOR, C_COLOR + 1, C_BG, C_BG + 1, C_BG + 2, C_SX, C_SX + 1, C_AB, C_AB + 1,
                   C_SHAPE, C_SHAPE + 1, C_SHAPE + 2]
CLASSIFIER_INPUTS = [C_AB, C_AB + 1]  # what layer 4's MLP (trained) reads
CLASSIFIER_FEATURES = [9, 10]  # their places in fast_features

STEP_GAIN = 60.0  # GELU(g z) / g ~ relu(z)
BETA = 40.0  # attention sharpness on chroma: shapes >= 0.35, backgrounds <= 0.1
BETA4 = 60.0  # layer 4, where indicators add to the score
GAMMA = 25.0  # layer 4: weight of the conditioning indicator
INSIDE = (0.22, 0.1)  # layer 2 MLP: a sub-bin is shape when its chroma passes 0.22 .. 0.32 (a soft step)
BG_BETA = 10.0
FAR = 1.5  # "far": beyond 1.5 variances
SQUARE = float(np.sqrt(np.pi / 2))  # (GELU(d) + GELU(-d)) * SQUARE = d erf(d / sqrt 2) sqrt(pi / 2) ~ d^2
VAR_STEP = 1e-5  # width of the steps on squared distances (tile units^2); the smallest shape variance is ~2.4e-4
SIGN_STEP = 5e-4  # width of the step on y - cy (a sub-bin is 0.0078)
LATTICE_A = [0, 2, 5, 7, 8, 10, 13, 15]  # sub-bins of layer 4's heads 0-7 (A) and 8-15 (B): a checkerboard each
LATTICE_B = [1, 3, 4, 6, 9, 11, 12, 14]


def bin_centres() -> np.ndarray:
    """(16, 2) sub-bin centres (x, y) in patch pixels, row-major over the 4 x 4 bins."""
    c = [(a + b) / 2 for a, b in BIN_EDGES]
    return np.asarray([(c[bx], c[by]) for by in range(BINS) for bx in range(BINS)])


def vision_config_kwargs() -> dict:
    """InternVLVisionConfig arguments of the constructed encoder (the sizes above)."""
    return dict(hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=HEADS, intermediate_size=MLP,
                image_size=TILE_SIZE, patch_size=PATCH, hidden_act="gelu", norm_type="rms_norm", layer_norm_eps=1e-6,
                attention_bias=True, use_qk_norm=False, use_mean_pooling=True, use_absolute_position_embeddings=True,
                layer_scale_init_value=1.0, initializer_range=0.02)


@torch.no_grad()
def set_vision(vision) -> None:
    """Write the constructed weights into an InternVLVisionModel built from vision_config_kwargs()."""
    for p in vision.parameters():
        p.zero_()
    emb = vision.embeddings
    conv = emb.patch_embeddings.projection  # (HIDDEN, 3, 14, 14)
    mean = torch.tensor(IMAGENET_MEAN)
    std = torch.tensor(IMAGENET_STD)
    # u_c = x_c * std_c + mean_c is the pixel / 255 of channel c
    conv.bias[C_ONE] = BIG
    for k in range(16):
        by, bx = divmod(k, BINS)
        (y0, y1), (x0, x1) = BIN_EDGES[by], BIN_EDGES[bx]
        n = (y1 - y0) * (x1 - x0)
        for ch, (a, b) in ((C_D1 + k, (0, 1)), (C_D2 + k, (1, 2))):
            conv.weight[ch, a, y0:y1, x0:x1] = std[a] / n
            conv.weight[ch, b, y0:y1, x0:x1] = -std[b] / n
            conv.bias[ch] = mean[a] - mean[b]
    for c in range(3):
        conv.weight[C_RGB + c, c] = std[c] / (PATCH * PATCH)
        conv.bias[C_RGB + c] = mean[c]
    pos = emb.position_embeddings[0]  # (1 + 1024, HIDDEN)
    rows, cols = np.divmod(np.arange(SIDE * SIDE), SIDE)
    X = torch.tensor(cols / SIDE, dtype=torch.float32)  # patch origin, tile units
    Y = torch.tensor(rows / SIDE, dtype=torch.float32)
    for i, (a, b) in enumerate(MONOMIALS):
        pos[1:, C_POS + i] = X ** a * Y ** b
    pos[0, C_CLS] = 1.0
    emb.cls_token[0, 0, C_ONE] = BIG  # the class token is a token like the others (its rms as theirs)

    layers = vision.encoder.layer
    for layer in layers:
        # RMSNorm ~ identity: every channel scaled back by the token's rms (~ BIG / 16) except the constant -> 1
        for norm in (layer.layernorm_before, layer.layernorm_after):
            norm.weight.fill_(RMS0)
            norm.weight[C_ONE] = RMS0 / BIG
        layer.lambda_1.fill_(1.0)
        layer.lambda_2.fill_(1.0)

    # layer 1 MLP: the chroma of each sub-bin, max - min of its RGB = (|R-G| + |G-B| + |B-R|) / 2, into C_S + k
    mlp = layers[0].mlp
    unit = 0
    for k in range(16):
        for d in ({C_D1 + k: 1.0}, {C_D1 + k: -1.0}, {C_D2 + k: 1.0}, {C_D2 + k: -1.0},
                  {C_D1 + k: 1.0, C_D2 + k: 1.0}, {C_D1 + k: -1.0, C_D2 + k: -1.0}):
            for ch, w in d.items():
                mlp.fc1.weight[unit, ch] = STEP_GAIN * w
            mlp.fc2.weight[C_S + k, unit] = 0.5 / STEP_GAIN
            unit += 1
    assert unit <= MLP, unit

    scale = HEAD_DIM ** -0.5
    centres = bin_centres() / TILE_SIZE  # sub-bin centre offsets from the patch origin, tile units
    px, py = C_POS + MONOMIALS.index((1, 0)), C_POS + MONOMIALS.index((0, 1))

    # layer 2 attention: head k attends to the patches where sub-bin k is shape (never the class token) and averages
    # the sub-bin's centre and colour; the heads' mean: the centroid and colour of the shape
    att = layers[1].attention
    for k in range(16):
        q0 = k * HEAD_DIM
        att.q_proj.bias[q0] = 1.0
        att.k_proj.weight[q0, C_S + k] = BETA / scale
        att.k_proj.weight[q0, C_CLS] = -1000.0 / scale
        ox, oy = centres[k]
        att.v_proj.weight[q0 + 0, px] = 1.0
        att.v_proj.weight[q0 + 0, C_ONE] = ox
        att.v_proj.weight[q0 + 1, py] = 1.0
        att.v_proj.weight[q0 + 1, C_ONE] = oy
        att.v_proj.weight[q0 + 2, C_D1 + k] = 1.0
        att.v_proj.weight[q0 + 3, C_D2 + k] = 1.0
        for j, ch in enumerate((C_CX, C_CX + 1, C_COLOR, C_COLOR + 1)):
            att.projection_layer.weight[ch, q0 + j] = 1.0 / 16
    # layer 2 MLP: per sub-bin (x - cx)^2 and (y - cy)^2 (GELU(d) + GELU(-d) = d erf(d / sqrt 2))
    mlp = layers[1].mlp
    unit = 0
    for k in range(16):
        ox, oy = centres[k]
        for pos, off, centre, out in ((px, ox, C_CX, C_DX2 + k), (py, oy, C_CX + 1, C_DY2 + k)):
            for sign in (1.0, -1.0):
                mlp.fc1.weight[unit, pos] = sign
                mlp.fc1.weight[unit, C_ONE] = sign * off
                mlp.fc1.weight[unit, centre] = -sign
                mlp.fc2.weight[out, unit] = SQUARE
                unit += 1
        t, width = INSIDE
        gain = 20.0 / width
        for shift, sign in ((t, 1.0), (t + width, -1.0)):
            mlp.fc1.weight[unit, C_S + k] = gain
            mlp.fc1.bias[unit] = -gain * shift
            mlp.fc2.weight[C_IN + k, unit] = sign / (gain * width)
            unit += 1
    # layer 3 attention: heads 0-14 average the squared distances over the shape (its variances); head 15: the
    # background, the patches without any shape
    att = layers[2].attention
    for k in range(15):
        q0 = k * HEAD_DIM
        att.q_proj.bias[q0] = 1.0
        att.k_proj.weight[q0, C_IN + k] = BETA / scale
        att.k_proj.weight[q0, C_CLS] = -1000.0 / scale
        att.v_proj.weight[q0 + 0, C_DX2 + k] = 1.0
        att.v_proj.weight[q0 + 1, C_DY2 + k] = 1.0
        att.projection_layer.weight[C_SX, q0 + 0] = 1.0 / 15
        att.projection_layer.weight[C_SX + 1, q0 + 1] = 1.0 / 15
    q0 = 15 * HEAD_DIM
    att.q_proj.bias[q0] = 1.0
    for k in range(16):
        att.k_proj.weight[q0, C_S + k] = -BG_BETA / scale
    att.k_proj.weight[q0, C_CLS] = -1000.0 / scale
    for c in range(3):
        att.v_proj.weight[q0 + c, C_RGB + c] = 1.0
        att.projection_layer.weight[C_BG + c, q0 + c] = 1.0
    # layer 3 MLP: per sub-bin four soft steps: wide (dx^2 > var x), below (y > cy), far x, far y (> FAR var)
    mlp = layers[2].mlp
    unit = 0
    for k in range(16):
        ox, oy = centres[k]
        conditions = [  # (weights of z, step width, output): step(z) with z linear in the channels
            ({C_DX2 + k: 1.0, C_SX: -1.0}, VAR_STEP, C_I + k),
            ({py: 1.0, C_ONE: oy, C_CX + 1: -1.0}, SIGN_STEP, C_I + 16 + k),
            ({C_DX2 + k: 1.0, C_SX: -FAR}, VAR_STEP, C_I + 32 + k),
            ({C_DY2 + k: 1.0, C_SX + 1: -FAR}, VAR_STEP, C_I + 48 + k),
        ]
        for weights, width, out in conditions:
            gain = 20.0 / width
            for shift, sign in ((0.0, 1.0), (width, -1.0)):
                for ch, w in weights.items():
                    mlp.fc1.weight[unit, ch] = gain * w
                mlp.fc1.bias[unit] = -gain * shift
                mlp.fc2.weight[out, unit] = sign / (gain * width)
                unit += 1
    assert unit <= MLP, unit
    # layer 4 attention: heads 0-7 (sub-bins LATTICE_A): among the shape's wide sub-bins, the share below the
    # centroid (a triangle's base is wide); heads 8-15 (LATTICE_B): among sub-bins far out in x, the share far out
    # in y (a square's corners)
    att = layers[3].attention
    for h in range(16):
        q0 = h * HEAD_DIM
        k = (LATTICE_A + LATTICE_B)[h]
        cond, value, out = (C_I + k, C_I + 16 + k, C_AB) if h < 8 else (C_I + 32 + k, C_I + 48 + k, C_AB + 1)
        att.q_proj.bias[q0] = 1.0
        att.k_proj.weight[q0, C_IN + k] = BETA4 / scale
        att.k_proj.weight[q0, cond] = GAMMA / scale
        att.k_proj.weight[q0, C_CLS] = -1000.0 / scale
        att.v_proj.weight[q0, value] = 1.0
        att.projection_layer.weight[out, q0] = 1.0 / 8
    # layer 4 MLP: the shape classifier, trained (shape_head.train_shape_head)


@torch.no_grad()
def vision_tokens(vision, pixel_values: torch.Tensor, *, layers: int | None = None) -> torch.Tensor:
    """Hidden states (N, 1025, HIDDEN) after `layers` encoder layers (all by default)."""
    h = vision.embeddings(pixel_values)
    for layer in vision.encoder.layer[: layers if layers is not None else len(vision.encoder.layer)]:
        out = layer(h)
        h = out[0] if isinstance(out, tuple) else out
    return h


GAIN_T = torch.tensor(STEP_GAIN)


def _chroma(d1: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """Layer 1's MLP on (..., 16) sub-bin colour differences (the same GELU arithmetic)."""
    gelu = torch.nn.functional.gelu
    out = torch.zeros_like(d1)
    for d in (d1, -d1, d2, -d2, d1 + d2, -(d1 + d2)):
        out = out + gelu(STEP_GAIN * d) * (0.5 / STEP_GAIN)
    return out


def _step(z: torch.Tensor, width: float) -> torch.Tensor:
    gelu = torch.nn.functional.gelu
    gain = 20.0 / width
    return (gelu(gain * z) - gelu(gain * (z - width))) / (gain * width)


@torch.no_grad()
def fast_features(pixels: np.ndarray) -> torch.Tensor:
    """(N, len(GLOBAL_CHANNELS) - 3) per-tile global features before the shape classifier (centroid, colour,
    background, variances, A, B), computed directly with the constructed layers' arithmetic (RMSNorms taken as
    exact), ~100x faster than the encoder: what training uses; equal to the encoder's (tests/unit/training)."""
    gelu = torch.nn.functional.gelu
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32) / 255.0  # (N, 448, 448, 3)
    n = x.shape[0]
    p = x.view(n, SIDE, PATCH, SIDE, PATCH, 3)
    bins = []
    for by in range(BINS):
        y0, y1 = BIN_EDGES[by]
        for bx in range(BINS):
            x0, x1 = BIN_EDGES[bx]
            bins.append(p[:, :, y0:y1, :, x0:x1, :].mean(dim=(2, 4)))  # (N, 32, 32, 3)
    b = torch.stack(bins, dim=-2).view(n, SIDE * SIDE, 16, 3)
    d1 = b[..., 0] - b[..., 1]
    d2 = b[..., 1] - b[..., 2]
    c = _chroma(d1, d2)  # (N, 1024, 16)
    rows, cols = np.divmod(np.arange(SIDE * SIDE), SIDE)
    centres = torch.tensor(bin_centres() / TILE_SIZE, dtype=torch.float32)
    xk = torch.tensor(cols / SIDE, dtype=torch.float32)[:, None] + centres[None, :, 0]  # (1024, 16)
    yk = torch.tensor(rows / SIDE, dtype=torch.float32)[:, None] + centres[None, :, 1]

    def mean_over(w: torch.Tensor, v: torch.Tensor, heads: list[int] | None = None) -> torch.Tensor:
        """Each head (sub-bin) k: sum over patches of w[..., k] v[..., k]; the mean over the heads."""
        out = (w * v).sum(1)  # (N, 16)
        return out[:, heads].mean(-1) if heads is not None else out.mean(-1)

    w = torch.softmax(BETA * c, dim=1)  # layer 2: per sub-bin, over the patches
    inside = _step(c - INSIDE[0], INSIDE[1])
    cx = mean_over(w, xk.expand(n, -1, -1))
    cy = mean_over(w, yk.expand(n, -1, -1))
    col1, col2 = mean_over(w, d1), mean_over(w, d2)
    dx, dy = xk[None] - cx[:, None, None], yk[None] - cy[:, None, None]
    dx2 = (gelu(dx) + gelu(-dx)) * SQUARE
    dy2 = (gelu(dy) + gelu(-dy)) * SQUARE
    w3 = torch.softmax(BETA * inside, dim=1)
    sx = mean_over(w3, dx2, list(range(15)))
    sy = mean_over(w3, dy2, list(range(15)))
    bw = torch.softmax(-BG_BETA * c.sum(-1), dim=1)  # layer 3, last head
    rgb = p.mean(dim=(2, 4)).reshape(n, SIDE * SIDE, 3)
    bg = (bw[..., None] * rgb).sum(1)
    wide = _step(dx2 - sx[:, None, None], VAR_STEP)
    below = _step(dy, SIGN_STEP)
    far_x = _step(dx2 - FAR * sx[:, None, None], VAR_STEP)
    far_y = _step(dy2 - FAR * sy[:, None, None], VAR_STEP)
    wa = torch.softmax(BETA4 * inside + GAMMA * wide, dim=1)
    wb = torch.softmax(BETA4 * inside + GAMMA * far_x, dim=1)
    a = mean_over(wa, below, LATTICE_A)
    bb = mean_over(wb, far_y, LATTICE_B)
    return torch.stack([cx, cy, col1, col2, bg[:, 0], bg[:, 1], bg[:, 2], sx, sy, a, bb], dim=-1)
