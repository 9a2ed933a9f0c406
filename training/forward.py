"""The language model's training forward: logits at the text tokens alone, the reader heads' image side computed once
per training sequence and cached (`image_part`), equal to the transformers forward on the full prompt
(tests/unit/training/test_train_parity.py) at a few hundredths of its cost."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.embedded.tiny_model import IM_END, IMAGE_SEQ_LENGTH, IMG_CONTEXT
from training.model import HEAD_DIM, TEXT_HEADS, TEXT_KV_HEADS
from training.samples import Sample

IGNORE = -100  # target of the prompt's tokens: no loss there


class Layouts:
    """Per (layout, question): the prompt's text token ids and their positions in the full prompt (exactly
    Prompter.prompt_ids), and the positions of each tile's image tokens."""

    def __init__(self, tokenizer) -> None:
        from pipeline.model.transformers_engine import Prompter

        self.tokenizer = tokenizer
        self.prompter = Prompter(tokenizer, IMAGE_SEQ_LENGTH)
        self.image_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.eos_id = tokenizer.convert_tokens_to_ids(IM_END)
        self._cache: dict = {}
        self._answers: dict = {}

    def prompt(self, layout: tuple, question: str) -> tuple[list[int], list[int], int]:
        """(text ids, their positions, the first image token's position); image tokens follow tile by tile."""
        key = (layout, question)
        if key not in self._cache:
            kind, tiles = layout
            ids = self.prompter.prompt_ids(question, list(tiles), video=kind == "video")
            text = [(i, t) for i, t in enumerate(ids) if t != self.image_id]
            image = [i for i, t in enumerate(ids) if t == self.image_id]
            assert len(image) == sum(tiles) * IMAGE_SEQ_LENGTH
            self._cache[key] = ([t for _, t in text], [i for i, _ in text], image)
        return self._cache[key]

    def answer(self, text: str) -> list[int]:
        """The answer's token ids followed by <|im_end|> (what the loss is on)."""
        if text not in self._answers:
            self._answers[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]
        return self._answers[text]


def _rope(lm, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lm.rotary_emb(x, positions)


def _heads(proj, x: torch.Tensor, n: int) -> torch.Tensor:
    b, t, _ = x.shape
    return proj(x).view(b, t, n, HEAD_DIM).transpose(1, 2)


@torch.no_grad()
def image_part(model, pos: torch.Tensor, img: torch.Tensor, img_pos: torch.Tensor,
               img_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What layer 0's reader heads (0 and 1, key/value head 0) get from the image tokens at each text position:
    the log-sum-exp of their scores on the image keys (B, 2, T) and the image values' softmax-weighted mean
    (B, 2, T, HEAD_DIM). All the entries involved are constructed and frozen and the reader queries are their bias
    alone (q_proj rows zero), so this depends on the sample and the positions only: computed once per training
    item, the language model's training never touches an image token again."""
    lm = model.model.language_model
    layer = lm.layers[0]
    att = layer.self_attn
    assert not att.q_proj.weight[: 2 * HEAD_DIM].any(), "reader queries must be bias-only"
    b, t = pos.shape
    q = att.q_proj.bias[: 2 * HEAD_DIM].view(1, 2, 1, HEAD_DIM).expand(b, 2, t, HEAD_DIM)
    cos, sin = _rope(lm, img, pos)
    q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
    shared = img.stride(0) == 0 and img_pos.stride(0) == 0  # one image for every row (make_sample_items)
    one = slice(0, 1) if shared else slice(None)
    xi = layer.input_layernorm(img[one])
    ki = _heads(att.k_proj, xi, TEXT_KV_HEADS)[:, :1]
    vi = _heads(att.v_proj, xi, TEXT_KV_HEADS)[:, :1]
    ci, si = _rope(lm, xi, img_pos[one])
    ki = ki * ci[:, None] + _rotate_half(ki) * si[:, None]
    scores = (q @ ki.transpose(-1, -2)) / math.sqrt(HEAD_DIM)  # (B, 2, T, I)
    mask = (img_pos[:, None, :] < pos[:, :, None]) & img_valid[:, None, :]  # (B, T, I)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where no image token precedes
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return lse, weights @ vi


def text_logits(model, ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, img_lse: torch.Tensor,
                img_value: torch.Tensor) -> torch.Tensor:
    """Logits at the text tokens of B prompts, as the full model computes them there (tests/unit/training checks
    it against the transformers forward): the image tokens reach the text only through layer 0's reader heads
    (every other head scores them -REPEL, exp(-100) of a weight), whose image side is image_part's (img_lse,
    img_value), joined to their text side in one softmax. ids/pos/valid: (B, T) text tokens, their positions in the
    full prompt, not padding."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    lm = model.model.language_model
    h = lm.embed_tokens(ids)
    b, t, _ = h.shape
    causal = (pos[:, None, :] <= pos[:, :, None]) & valid[:, None, :]  # (B, Tq, Tk)
    causal = causal | torch.eye(t, dtype=torch.bool)[None]
    cos, sin = _rope(lm, h, pos)
    for li, layer in enumerate(lm.layers):
        att = layer.self_attn
        x = layer.input_layernorm(h)
        q = _heads(att.q_proj, x, TEXT_HEADS)
        k = _heads(att.k_proj, x, TEXT_KV_HEADS)
        v = _heads(att.v_proj, x, TEXT_KV_HEADS)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(TEXT_HEADS // TEXT_KV_HEADS, dim=1)
        v = v.repeat_interleave(TEXT_HEADS // TEXT_KV_HEADS, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(HEAD_DIM)  # (B, H, Tq, Tk)
        scores = scores.masked_fill(~causal[:, None], float("-inf"))
        if li == 0:
            both = torch.softmax(torch.cat([scores[:, :2], img_lse[..., None]], dim=-1), dim=-1)
            reader = both[..., :t] @ v[:, :2] + both[..., t:] * img_value
            rest = torch.softmax(scores[:, 2:], dim=-1) @ v[:, 2:]
            out = torch.cat([reader, rest], dim=1)
        else:
            out = torch.softmax(scores, dim=-1) @ v
        h = h + att.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(lm.norm(h))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-b, a), dim=-1)


@dataclass
class Item:
    """One training sequence: prompt text + answer, its positions, targets and the reader heads' image side."""

    kind: str
    ids: torch.Tensor  # (T,)
    pos: torch.Tensor
    target: torch.Tensor
    img_lse: torch.Tensor  # (2, T)
    img_value: torch.Tensor  # (2, T, HEAD_DIM)


def make_item(model, layouts: Layouts, sample: Sample, emb: torch.Tensor, question: str, answer: str) -> Item:
    """emb: (tiles, hidden) what the projector gives every token of each tile."""
    return make_sample_items(model, layouts, sample, emb, [(question, answer)])[0]


def make_sample_items(model, layouts: Layouts, sample: Sample, emb: torch.Tensor,
                      qa: Sequence[tuple[str, str]]) -> list[Item]:
    """One Item per (question, answer) of a sample; the image side computed for all its questions at once."""
    rows = []
    for question, answer in qa:
        ids, pos, image = layouts.prompt(sample.layout, question)
        ans = layouts.answer(answer)
        full_pos = pos + list(range(pos[-1] + 1, pos[-1] + len(ans)))
        rows.append((ids + ans[:-1], full_pos, [IGNORE] * (len(ids) - 1) + ans, image))
    image = rows[0][3]
    assert all(r[3] == image for r in rows)  # the questions follow the image tokens
    t = max(len(r[0]) for r in rows)
    pos = torch.stack([torch.tensor(r[1] + [r[1][-1] + 1 + j for j in range(t - len(r[1]))]) for r in rows])
    img = emb.repeat_interleave(IMAGE_SEQ_LENGTH, dim=0)[None].expand(len(rows), -1, -1)
    img_pos = torch.tensor(image)[None].expand(len(rows), -1)
    lse, value = image_part(model, pos, img, img_pos, torch.ones(img_pos.shape, dtype=torch.bool))
    return [Item(sample.kind, torch.tensor(ids), torch.tensor(p), torch.tensor(tg), lse[i, :, :len(ids)],
                 value[i, :, :len(ids)]) for i, (ids, p, tg, _) in enumerate(rows)]


def collate(items: Sequence[Item], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-pad items into (ids, pos, valid, target, img_lse, img_value) batch tensors."""
    t = max(len(it.ids) for it in items)
    bsz = len(items)
    ids = torch.full((bsz, t), pad_id)
    pos = torch.zeros((bsz, t), dtype=torch.long)
    valid = torch.zeros((bsz, t), dtype=torch.bool)
    target = torch.full((bsz, t), IGNORE)
    lse = torch.full((bsz, 2, t), float("-inf"))
    value = torch.zeros((bsz, 2, t, HEAD_DIM))
    for i, it in enumerate(items):
        n = len(it.ids)
        ids[i, :n] = it.ids
        pos[i, :n] = it.pos
        pos[i, n:] = it.pos[-1] + 1 + torch.arange(t - n)
        valid[i, :n] = True
        target[i, :n] = it.target
        lse[i, :, :n] = it.img_lse
        value[i, :, :n] = it.img_value
    return ids, pos, valid, target, lse, value


def lm_batch_logits(model, items: Sequence[Item], pad_id: int) -> torch.Tensor:
    """(B, T, vocab) logits at the items' text tokens (right-padded)."""
    ids, pos, valid, _, lse, value = collate(items, pad_id)
    return text_logits(model, ids, pos, valid, lse, value)


def make_items(model, layouts: Layouts, samples: Sequence[Sample], embeds: Sequence[torch.Tensor]) -> list[Item]:
    """Every sample's training sequences, one per (question, answer)."""
    return [it for smp, emb in zip(samples, embeds) for it in make_sample_items(model, layouts, smp, emb, smp.qa)]
