"""The fast training forward (training/forward.py) computes what the real model computes on the pipeline's path.

The language model is trained with `text_logits` (text tokens only, the reader heads' image side cached by
`image_part`) on tile embeddings from `tile_embedding(full_features(fast_features))`. Here a model with its
trainable entries set at random (large, so that any mismatch shows) is saved, loaded by InternVLEngine like any
checkpoint, and the logits of the transformers forward on the engine's prompt ids and image features are compared
with the training forward's at every text position: a multi-tile image, an image pair and a video.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.embedded import world as W
from pipeline.embedded.tiny_model import IMAGE_SEQ_LENGTH
from pipeline.media.images import load_tiles
from pipeline.media.tiling import tile_image
from training import seeing as S
from training.forward import Layouts, lm_batch_logits, make_item
from training.model import build_config, frozen_masks, new_model, tile_embedding
from training.samples import NUM_FRAMES, Sample, video_frames
from training.shape_head import full_features
from training.tokenizer import build_tokenizer
from training.train_tiny import save


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from pipeline.model.transformers_engine import InternVLEngine

    torch.set_num_threads(2)
    tokenizer = build_tokenizer()
    model = new_model(build_config(tokenizer), tokenizer, seed=0)
    gen = torch.Generator().manual_seed(1)
    named = dict(model.named_parameters())
    masks = frozen_masks(model)
    with torch.no_grad():  # stand-in for training: every trainable entry of the language model moved, a lot
        for name, p in named.items():
            if name.startswith(("model.language_model.", "lm_head.")):
                noise = torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.5)
                keep = masks.get(name, torch.zeros_like(p, dtype=torch.bool))
                p.add_(torch.where(keep, 0.0, noise))
        mlp = model.model.vision_tower.encoder.layer[3].mlp  # a shape classifier (random)
        mlp.fc1.weight[:, S.CLASSIFIER_INPUTS] = torch.randn(S.MLP, 2, generator=gen) * 3
        mlp.fc1.bias.copy_(torch.randn(S.MLP, generator=gen))
        mlp.fc2.weight[S.C_SHAPE:S.C_SHAPE + 3] = torch.randn(3, S.MLP, generator=gen) * 0.3
    out = tmp_path_factory.mktemp("parity") / "model"
    save(model, tokenizer, out)
    return InternVLEngine.load(str(out))


def _samples():
    rng = np.random.default_rng(11)
    image = W.draw_image(rng, tiles=7)
    yield "image", (7,), load_tiles(image.data, max_tiles=12).pixels, [W.CAPTION, W.WHAT_COLOR], image.answers[W.CAPTION]
    pair = W.draw_pair(rng, sizes=((900, 500), (300, 300)))
    parts = [load_tiles(im.data, max_tiles=6).pixels for im in pair.images]
    yield "pair", tuple(len(p) for p in parts), np.concatenate(parts), [pair.prompt], pair.answers[pair.prompt]
    spec = W.sample_video_spec(rng, size=(320, 240), fps=10, duration_s=2.0)
    frames = video_frames(spec)
    tiles = np.concatenate([tile_image(Image.fromarray(f, "RGB"), min_tiles=1, max_tiles=1).pixels for f in frames])
    yield "video", (1,) * NUM_FRAMES, tiles, [W.VIDEO_CAPTION, W.WHICH_WAY], W.video_answers(spec.scene, spec.direction)[W.WHICH_WAY]


@torch.no_grad()
def test_training_forward_equals_the_real_one(engine):
    model, layouts = engine.model, Layouts(engine.tokenizer)
    checked = 0
    for kind, layout, tiles, questions, answer in _samples():
        assert sum(layout) == len(tiles)
        features = engine.image_features([tiles])[0]  # (tiles x 256, hidden): the pipeline's vision path
        per_tile = features.view(len(tiles), IMAGE_SEQ_LENGTH, -1)
        assert float((per_tile - per_tile[:, :1]).abs().max()) < 1e-3  # every token of a tile the same
        fast = tile_embedding(full_features(model, S.fast_features(tiles)))
        assert torch.allclose(per_tile[:, 0], fast, atol=2e-2), (kind, (per_tile[:, 0] - fast).abs().max())
        sample = Sample(kind, layout, S.fast_features(tiles), [], [])
        for question in questions:
            prompt = engine.prompt_ids(question, list(layout), video=kind == "video")
            answer_ids = layouts.answer(answer)
            embeds, attention = engine.embed([prompt + answer_ids[:-1]], [features])
            real = model(inputs_embeds=embeds, attention_mask=attention).logits[0]
            for emb in (per_tile[:, 0], fast):  # the real features, and the fast twin's that training uses
                item = make_item(model, layouts, sample, emb, question, answer)
                assert item.ids.tolist() == [t for t in prompt if t != layouts.image_id] + answer_ids[:-1]
                got = lm_batch_logits(model, [item], engine.pad_id)[0]
                want = real[item.pos]
                assert want.abs().max() > 1.0  # the random language model is far from uniform
                tol = 1e-3 if emb is not fast else 5e-2
                assert torch.allclose(got, want, atol=tol), (kind, question, float((got - want).abs().max()))
            checked += 1
    assert checked == 5


def test_batched_padding_changes_nothing(engine):
    model, layouts = engine.model, Layouts(engine.tokenizer)
    rng = np.random.default_rng(2)
    items = []
    for tiles, q in ((1, W.WHAT_SHAPE), (13, W.CAPTION), (4, W.is_color("red"))):
        d = W.draw_image(rng, tiles=tiles)
        px = load_tiles(d.data, max_tiles=12).pixels
        emb = tile_embedding(full_features(model, S.fast_features(px)))
        answer = d.answers.get(q) or ("yes" if d.yes_no[q] else "no")
        items.append(make_item(model, layouts, Sample("image", (len(px),), S.fast_features(px), [], []), emb, q, answer))
    with torch.no_grad():
        together = lm_batch_logits(model, items, engine.pad_id)
        for i, it in enumerate(items):
            alone = lm_batch_logits(model, [it], engine.pad_id)[0]
            assert torch.allclose(together[i, :len(it.ids)], alone, atol=1e-4)
