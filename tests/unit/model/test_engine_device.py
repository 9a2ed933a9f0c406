"""The transformers engine's work on the device: the vision tower in chunks of tiles (same features as one pass),
each generated token's log-probability gathered on the device (same numbers as the full-vocabulary way, and no
vocabulary-wide array copied to the host), and transformers' current cache API (no deprecation warnings)."""

from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from pipeline.media.tiling import tile_image
from pipeline.model.transformers_engine import InternVLEngine
from pipeline.model.sampling import RowSampler
from tests.conftest import pattern_image

SIZES = [(448, 448), (1344, 896), (1792, 1344)]  # 1, 7 and 13 tiles


@pytest.fixture(scope="module")
def engine(tiny_model):
    return InternVLEngine.load(str(tiny_model), device="cpu")


@pytest.fixture(scope="module")
def samples():
    return [tile_image(pattern_image(w, h)).pixels for w, h in SIZES]


def one_pass(engine, samples) -> torch.Tensor:
    """The vision tower and projector over every tile at once (the engine's way before chunks)."""
    pixels = np.concatenate(samples)
    with torch.inference_mode():
        return engine.model.model.get_image_features(
            pixel_values=engine.normalize(pixels), vision_feature_layer=engine.model.config.vision_feature_layer,
            vision_feature_select_strategy=engine.model.config.vision_feature_select_strategy).pooler_output


@pytest.mark.parametrize("chunk", [1, 5, 13, 32])
def test_vision_in_chunks_gives_the_features_of_one_pass(engine, samples, chunk):
    whole = one_pass(engine, samples)
    calls = []
    hook = engine.model.model.vision_tower.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    try:
        with torch.inference_mode():
            blocks = engine.image_features(samples, chunk_tiles=chunk)
    finally:
        hook.remove()
    assert calls == [min(chunk, 21 - k) for k in range(0, 21, chunk)]  # 1 + 7 + 13 tiles, `chunk` at a time
    assert [b.shape[0] for b in blocks] == [256 * len(s) for s in samples]
    assert torch.equal(torch.cat(blocks), whole.reshape(-1, whole.shape[-1]))  # bit for bit


def full_vocabulary_generate(engine, prompts, samples, *, max_new_tokens, min_new_tokens=0, seeds=None):
    """The engine's generate before this change, for one padded call: `output_logits`, every step's log-softmax
    over the whole vocabulary copied to the host, the chosen tokens read there."""
    features = engine.image_features(samples)
    embeds, attention = engine.embed(prompts, features)
    processors = LogitsProcessorList()
    if seeds is not None:
        processors.append(RowSampler(seeds, temperature=0.8, top_p=0.9, top_k=engine.model.generation_config.top_k))
    out = engine.model.generate(inputs_embeds=embeds, attention_mask=attention, max_new_tokens=max_new_tokens,
                                pad_token_id=engine.pad_id, eos_token_id=sorted(engine.eos_ids), output_logits=True,
                                return_dict_in_generate=True, do_sample=False, temperature=None, top_p=None,
                                top_k=None, logits_processor=processors, min_new_tokens=min_new_tokens or None)
    logprobs = torch.stack([torch.log_softmax(step.float(), dim=-1) for step in out.logits], dim=1).cpu()
    results = []
    for row in range(len(prompts)):
        tokens = out.sequences[row].tolist()
        end = next((i + 1 for i, t in enumerate(tokens) if t in engine.eos_ids), None)
        tokens = tokens[:end]
        results.append((tokens, [float(logprobs[row, i, t]) for i, t in enumerate(tokens)]))
    return results


@pytest.mark.parametrize("how", ["greedy", "min_new_tokens", "seeded"])
def test_log_probabilities_on_the_device_equal_the_full_vocabulary_way(engine, samples, monkeypatch, how):
    monkeypatch.setattr(engine, "language_groups", lambda p: [list(range(len(p)))])  # one padded call, as on GPU
    prompts = [engine.prompt_ids(q, [len(s)]) for q, s in zip(["Describe.", "What is it?", "Colours?"], samples)]
    # one row ends early on an end token (a generated token made one), the others run on: padding after an end
    free = engine.generate(prompts, samples, max_new_tokens=12)
    monkeypatch.setattr(engine, "eos_ids", engine.eos_ids | {free[0].token_ids[3]})
    options = dict(max_new_tokens=12, min_new_tokens=12 if how == "min_new_tokens" else 0,
                   seeds=[11, 12, 13] if how == "seeded" else None)
    sampled = dict(do_sample=True, temperature=0.8, top_p=0.9) if how == "seeded" else {}
    with torch.inference_mode():
        got = engine.generate(prompts, samples, **options, **sampled)
        want = full_vocabulary_generate(engine, prompts, samples, **options)
    for g, (tokens, logprobs) in zip(got, want):
        assert g.token_ids == tokens
        assert g.logprobs == logprobs  # the same float32 values, not merely close
    if how == "greedy":
        assert len(got[0].token_ids) == 4 and got[0].finished and max(len(g.token_ids) for g in got) == 12


@contextlib.contextmanager
def host_copies():
    """Shapes of the tensors brought to the host while the block runs: `.cpu()`, `.numpy()`, `.tolist()` and
    `.to("cpu")`. On this CPU-only machine those are no-ops, but they are the calls that copy from a GPU (transformers'
    own `.to(device=input_ids.device)` moves logits to the model's device, which is not the host on a GPU)."""
    seen: list[tuple[int, ...]] = []
    originals = {name: getattr(torch.Tensor, name) for name in ("cpu", "numpy", "tolist", "to")}

    def spy(name):
        def call(self, *args, **kwargs):
            if name != "to" or "cpu" in (args[:1] + (kwargs.get("device"),)):
                seen.append(tuple(self.shape))
            return originals[name](self, *args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as patch:
        for name in originals:
            patch.setattr(torch.Tensor, name, spy(name))
        yield seen


def test_no_vocabulary_wide_array_is_copied_to_the_host(engine, samples):
    vocab = engine.model.config.text_config.vocab_size
    prompts = [engine.prompt_ids("Describe.", [len(s)]) for s in samples]
    labels = [[engine.tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("yes", "no", " red car")]] * 3
    with host_copies() as seen:
        engine.generate(prompts, samples, max_new_tokens=8)
        engine.score(prompts, samples, [0, 1, 2], labels)
    assert seen and not [shape for shape in seen if vocab in shape]
    with host_copies() as seen:  # the check itself: the old way is caught
        full_vocabulary_generate(engine, prompts[:1], samples[:1], max_new_tokens=8)
    assert (1, 8, vocab) in seen


@pytest.fixture
def transformers_log():
    """transformers' own warnings (its logger, not Python's warnings), each of its warn-once messages afresh."""
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


def test_our_calls_raise_no_deprecation_warning_from_transformers(engine, samples, transformers_log):
    """transformers 5.2x renamed the KV cache `cache` (`past_key_values` warns, and goes in 5.40): generate and
    score run with every FutureWarning and DeprecationWarning made an error, and transformers logs no deprecation."""
    prompts = [engine.prompt_ids("Describe.", [len(s)]) for s in samples]
    labels = [[engine.tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("yes", "no", " red car")]] * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        engine.generate(prompts, samples, max_new_tokens=6)
        engine.generate(prompts, samples, max_new_tokens=6, do_sample=True, seeds=[1, 2, 3])
        engine.score(prompts, samples, [0, 1, 2], labels)
    assert not [m for m in transformers_log if "deprecat" in m.lower()], transformers_log
