"""VLLMEngine against InternVLEngine on the same tiny checkpoint: same prompts, same greedy tokens, same scores.

Greedy tokens must be equal and log-probs within 1e-3 (seen: a few 1e-6, float32 on CPU); label scores within 1e-4.
The figures seen are printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from tests.vllm.conftest import image  # noqa: E402

pytestmark = pytest.mark.vllm

MAX_NEW_TOKENS = 10
LOGPROB_TOL = 1e-3
SCORE_TOL = 1e-4


def compare(got, want, figures, name: str) -> None:
    assert got.token_ids == want.token_ids, name
    assert got.text == want.text, name
    diff = float(np.max(np.abs(np.subtract(got.logprobs, want.logprobs)))) if want.logprobs else 0.0
    figures("generate: max |logprob diff|", diff)
    assert diff < LOGPROB_TOL, name


def test_vision_part_only_and_features_bit_equal(vllm_engine, hf_engine, cases):
    """The vLLM engine keeps no transformers language model; its features are the transformers engine's."""
    net = vllm_engine.model
    assert not hasattr(net, "lm_head") and not hasattr(net.model, "language_model")
    vision = sum(p.numel() for p in hf_engine.model.model.vision_tower.parameters())
    projector = sum(p.numel() for p in hf_engine.model.model.multi_modal_projector.parameters())
    assert sum(p.numel() for p in net.parameters()) == vision + projector
    samples = [c[4] for c in cases]
    with torch.inference_mode():
        for a, b in zip(vllm_engine.image_features(samples), hf_engine.image_features(samples)):
            assert torch.equal(a, b)


def test_prompt_ids_expand_to_ours(vllm_engine, hf_engine, cases):
    """One <IMG_CONTEXT> per image (or frame) plus one embedding each: vLLM's prompt ids are prompt_ids' ids."""
    from vllm import SamplingParams

    for name, text, tiles, video, pixels in cases:
        ids = vllm_engine.prompt_ids(text, tiles, video=video)
        assert ids == hf_engine.prompt_ids(text, tiles, video=video), name
        compact, sizes = vllm_engine.split_prompt(ids)
        assert sizes == [256 * t for t in tiles] and compact.count(vllm_engine.context_id) == len(tiles)
        request = vllm_engine._requests([ids], vllm_engine._loop.run(vllm_engine._features([pixels])), [0])[0]
        out = vllm_engine._loop.run(vllm_engine._final(request, SamplingParams(max_tokens=1, detokenize=False)))
        assert list(out.prompt_token_ids) == ids, name


def test_greedy_each_layout_alone(vllm_engine, hf_engine, cases, figures):
    for name, text, tiles, video, pixels in cases:
        ids = hf_engine.prompt_ids(text, tiles, video=video)
        want = hf_engine.generate([ids], [pixels], max_new_tokens=MAX_NEW_TOKENS)[0]
        got = vllm_engine.generate([ids], [pixels], max_new_tokens=MAX_NEW_TOKENS)[0]
        compare(got, want, figures, name)


def test_greedy_one_batch_with_three_questions_on_a_sample(vllm_engine, hf_engine, cases, figures):
    """All layouts in one call, plus a sample asked three questions (owners share its features)."""
    prompts, samples, owners = [], [], []
    for _, text, tiles, video, pixels in cases:
        samples.append(pixels)
        prompts.append(hf_engine.prompt_ids(text, tiles, video=video))
        owners.append(len(samples) - 1)
    samples.append(image(1344, 896))
    for question in ("What colour is it?", "Is it dark?", "Count the stripes."):
        prompts.append(hf_engine.prompt_ids(question, [7]))
        owners.append(len(samples) - 1)
    want = hf_engine.generate(prompts, samples, owners, max_new_tokens=MAX_NEW_TOKENS)
    got = vllm_engine.generate(prompts, samples, owners, max_new_tokens=MAX_NEW_TOKENS)
    for k, (g, w) in enumerate(zip(got, want)):
        compare(g, w, figures, f"row {k}")
    assert len({tuple(g.token_ids) for g in got}) > len(got) // 2  # outputs depend on image and question


def test_questions_on_one_image_reuse_its_kv_blocks(vllm_engine, hf_engine):
    """Automatic prefix caching works with embedding inputs: a second question on the same image reads the
    image's blocks (block-aligned part of the shared prefix) from the cache."""
    from vllm import SamplingParams

    pixels = image(1344, 896)
    features = vllm_engine._loop.run(vllm_engine._features([pixels]))
    cached = []
    for question in ("A first question?", "A second one?"):
        request = vllm_engine._requests([hf_engine.prompt_ids(question, [7])], features, [0])[0]
        out = vllm_engine._loop.run(vllm_engine._final(request, SamplingParams(max_tokens=1, detokenize=False)))
        cached.append(out.num_cached_tokens)
    assert cached[1] >= 7 * 256 - vllm_engine.llm.vllm_config.cache_config.block_size


def test_end_of_sequence_stops_both_engines_alike(vllm_engine, hf_engine, cases, monkeypatch):
    """With a token the model does generate made an end token, both stop there and keep it (its log-prob too)."""
    _, text, tiles, video, pixels = cases[1]
    ids = hf_engine.prompt_ids(text, tiles, video=video)
    free = hf_engine.generate([ids], [pixels], max_new_tokens=MAX_NEW_TOKENS)[0]
    stop = free.token_ids[3]
    monkeypatch.setattr(hf_engine, "eos_ids", hf_engine.eos_ids | {stop})
    monkeypatch.setattr(vllm_engine, "eos_ids", vllm_engine.eos_ids | {stop})
    want = hf_engine.generate([ids], [pixels], max_new_tokens=MAX_NEW_TOKENS)[0]
    got = vllm_engine.generate([ids], [pixels], max_new_tokens=MAX_NEW_TOKENS)[0]
    assert want.token_ids == free.token_ids[: free.token_ids.index(stop) + 1] == got.token_ids
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=LOGPROB_TOL)
    # min_new_tokens (benches' fixed answer length): end tokens suppressed until then, as transformers does it
    want = hf_engine.generate([ids], [pixels], max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS)[0]
    got = vllm_engine.generate([ids], [pixels], max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS)[0]
    assert len(want.token_ids) == MAX_NEW_TOKENS and stop not in want.token_ids[:-1]
    assert got.token_ids == want.token_ids
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=LOGPROB_TOL)  # raw log-probs, before the masking


def block_multiple_prompt(engine, tiles: list[int]) -> list[int]:
    """A prompt whose length is a multiple of vLLM's KV block size: where reading prompt log-probs through the
    prefix cache returns garbage, so scoring must not depend on them."""
    block = engine.llm.vllm_config.cache_config.block_size
    for n in range(2 * block):
        ids = engine.prompt_ids("Is it " + "very " * n + "red?", tiles)
        if len(ids) % block == 0:
            return ids
    raise AssertionError("no prompt length is a multiple of the block size")


def test_label_scores(vllm_engine, hf_engine, cases, figures):
    """Single- and multi-token labels (sharing first tokens too), several prompts and samples in one call, and a
    prompt of a block-multiple length scored twice (the second time its blocks are in the prefix cache)."""
    tok = hf_engine.tokenizer
    labels = [tok(label, add_special_tokens=False)["input_ids"]
              for label in ("yes", "no", "1", "2", "3", " red car", " red cup", " blue")]
    assert min(map(len, labels)) == 1 and max(map(len, labels)) >= 2
    assert len({tuple(seq[:1]) for seq in labels}) < len(labels)  # some labels share a first token
    rating = [tok(str(k), add_special_tokens=False)["input_ids"] for k in range(1, 6)]
    samples = [cases[0][4], cases[1][4], cases[4][4]]
    prompts = [hf_engine.prompt_ids("Is it red?", [1]), block_multiple_prompt(vllm_engine, [7]),
               block_multiple_prompt(vllm_engine, [7]), hf_engine.prompt_ids("Rate it.", cases[4][2], video=True)]
    owners, per_prompt = [0, 1, 1, 2], [labels, labels, rating, rating]
    want = hf_engine.score(prompts, samples, owners, per_prompt)
    for _ in range(2):
        got = vllm_engine.score(prompts, samples, owners, per_prompt)
        diff = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))
        figures("score: max |log P(label) diff|", diff)
        assert diff < SCORE_TOL
    assert len({round(s, 3) for s in got[0]}) == len(labels)


def test_sampling_depends_only_on_the_prompts_seed(vllm_engine, hf_engine, cases):
    """Per-request seeds: a prompt's sample is the same alone, in a batch, in another order; seeds differ."""
    _, text, tiles, video, pixels = cases[1]
    ids = hf_engine.prompt_ids(text, tiles, video=video)
    other = hf_engine.prompt_ids("Is it dark?", [1])
    kw = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=1.0, top_p=0.95)
    alone = vllm_engine.generate([ids], [pixels], seeds=[7], **kw)[0]
    batched = vllm_engine.generate([other, ids, ids], [cases[0][4], pixels], [0, 1, 1], seeds=[3, 7, 8], **kw)
    assert batched[1].token_ids == alone.token_ids
    assert batched[2].token_ids != alone.token_ids  # another seed, another sample (tiny model: near-flat logits)
    greedy = vllm_engine.generate([ids], [pixels], max_new_tokens=MAX_NEW_TOKENS)[0]
    assert alone.token_ids != greedy.token_ids
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        vllm_engine.generate([ids], [pixels], seeds=[1, 2], **kw)


def test_async_calls_in_flight_together_equal_sync(vllm_engine, hf_engine, cases):
    """generate_async / score_async from another event loop (as a Ray async actor's): several calls in flight at
    once, each answer as generate() gives it alone."""
    batches = [([hf_engine.prompt_ids(text, tiles, video=video)], [pixels]) for _, text, tiles, video, pixels in cases]
    want = [vllm_engine.generate(p, s, max_new_tokens=MAX_NEW_TOKENS)[0].token_ids for p, s in batches]
    labels = [[hf_engine.tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("yes", "no")]]
    want_scores = vllm_engine.score(*batches[0], [0], labels)

    async def main():
        spans = []

        async def one(p, s):
            start = time.perf_counter()
            out = await vllm_engine.generate_async(p, s, max_new_tokens=MAX_NEW_TOKENS)
            spans.append((start, time.perf_counter()))
            return out[0].token_ids

        got = await asyncio.gather(*(one(p, s) for p, s in batches))
        scores = await vllm_engine.score_async(*batches[0], [0], labels)
        return got, scores, spans

    got, scores, spans = asyncio.run(main())
    assert got == want
    np.testing.assert_allclose(scores, want_scores, atol=1e-9)
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # all were in flight at one moment


def test_engine_options_are_checked():
    from pipeline.config import VLLMConfig
    from pipeline.model.vllm_support import engine_args

    args = engine_args("/nowhere", torch.float32, {"max_num_seqs": 4, "enable_chunked_prefill": False})
    assert args.max_num_seqs == 4 and args.enable_mm_embeds and args.limit_mm_per_prompt == {"image": 0, "video": 0}
    assert args.tensor_parallel_size == 1
    every = VLLMConfig(gpu_memory_utilization=0.5, max_num_seqs=8, max_model_len=4096, enable_prefix_caching=True,
                       enable_chunked_prefill=True, enforce_eager=True, kv_cache_memory_bytes=1 << 30)
    args = engine_args("/nowhere", torch.bfloat16, every.engine_options(), tp=2)  # every compute.vllm key is vLLM's
    assert (args.tensor_parallel_size, args.distributed_executor_backend, args.gpu_memory_utilization) == (2, "mp", 0.5)
    with pytest.raises(ValueError, match="unknown vLLM engine option"):
        engine_args("/nowhere", torch.float32, {"max_num_seq": 4})
    with pytest.raises(ValueError, match="set by the engine"):
        engine_args("/nowhere", torch.float32, {"enable_mm_embeds": False})
    with pytest.raises(ValueError, match="set by the engine"):
        engine_args("/nowhere", torch.float32, {"tensor_parallel_size": 2})


def test_schema_answers_equal_transformers_and_follow_the_schema(vllm_engine, hf_engine, cases):
    """Job key `schema` on vLLM: its xgrammar backend with no free whitespace, special tokens forbidden
    (model/constrained.py's docstring): greedy schema answers are the transformers engine's, free prompts in the
    same call stay free, and an answer cut off at max_new_tokens is not `finished` on either engine."""
    pytest.importorskip("xgrammar")
    from pipeline.structured.answers import parse_answer
    from tests.schemas import SCHEMA, SMALL

    prompts, samples, owners = [], [], []
    for _, text, tiles, video, pixels in cases:
        samples.append(pixels)
        prompts.append(hf_engine.prompt_ids(text, tiles, video=video))
        owners.append(len(samples) - 1)
    schemas = [SCHEMA, SMALL, None, SCHEMA, SMALL]
    kw = dict(max_new_tokens=160, schemas=schemas)
    want = hf_engine.generate(prompts, samples, owners, **kw)
    got = vllm_engine.generate(prompts, samples, owners, **kw)
    for k, (g, w, schema) in enumerate(zip(got, want, schemas)):
        assert (g.text, g.finished) == (w.text, w.finished), k
        if schema is not None:
            assert g.finished, g.text
            parse_answer(g.text, schema, max_new_tokens=160, finished=True)
    short = vllm_engine.generate(prompts[:1], samples[:1], max_new_tokens=4, schemas=[SCHEMA])[0]
    assert not short.finished and len(short.token_ids) == 4


def test_schema_requests_block_the_few_forbidden_tokens(vllm_engine):
    """A schema request carries a logit bias of -inf on the special tokens an answer may never hold (a few dozen
    ids), not an allowed_token_ids list of every other id (~151k on the real tokenizer); a free prompt carries
    neither. The answers are the transformers engine's (test above)."""
    pytest.importorskip("xgrammar")
    from pipeline.model.constrained import blocked_token_ids
    from tests.schemas import SCHEMA

    schema, free = vllm_engine._params(2, max_new_tokens=4, schemas=[SCHEMA, None])
    blocked = blocked_token_ids(vllm_engine.tokenizer, sorted(vllm_engine.eos_ids))
    assert schema.allowed_token_ids is None and free.allowed_token_ids is None and not free.logit_bias
    assert sorted(schema.logit_bias) == blocked and set(schema.logit_bias.values()) == {float("-inf")}
    assert 0 < len(blocked) < 100 and not set(blocked) & vllm_engine.eos_ids
