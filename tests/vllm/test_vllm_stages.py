"""The model stages on vLLM (AsyncGenerate, AsyncScore) against the sync stages on transformers; several batches in
flight on one replica; sampled rows that depend only on (seed, row id)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("vllm")

from pipeline.config import parse_job  # noqa: E402
from pipeline.stages.generate import AsyncGenerate, Generate  # noqa: E402
from pipeline.stages.model_stage import BATCH_COLUMN  # noqa: E402
from pipeline.stages.score import AsyncScore, Score  # noqa: E402
from tests.conftest import pattern_image  # noqa: E402
from tests.helpers import preprocessed  # noqa: E402

pytestmark = pytest.mark.vllm

SIZES = [(448, 448), (1344, 896), (1792, 1344)]  # 1, 7 and 13 tiles
BASE = {"input": "x", "output": "y", "model": "m", "generation": {"max_new_tokens": 8}}


def rows_of(table):
    return {r["id"]: r for r in table.drop_columns([BATCH_COLUMN]).to_pylist()}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return tmp_path_factory.mktemp("images"), {f"{w}x{h}.png": pattern_image(w, h) for w, h in SIZES}


def test_generate_rows_equal_the_transformers_stage(vllm_engine, hf_engine, images):
    """vqa with three questions per sample: every row (response, token counts) as the transformers stage gives it."""
    job = parse_job(dict(BASE, task="vqa", questions=["Describe it.", "What colour?", "Is it dark?"]))
    batch = preprocessed(job, *images)
    want = rows_of(Generate(job, engine=hf_engine)(batch))
    got = rows_of(asyncio.run(AsyncGenerate(job, engine=vllm_engine)(batch)))
    assert got.keys() == want.keys() and len(got) == 9
    for key, row in want.items():
        assert {k: got[key][k] for k in ("response", "num_generated_tokens", "num_input_tokens", "status")} == \
               {k: row[k] for k in ("response", "num_generated_tokens", "num_input_tokens", "status")}, key
        assert got[key]["mean_logprob"] == pytest.approx(row["mean_logprob"], abs=1e-3)


def test_score_rows_equal_the_transformers_stage(vllm_engine, hf_engine, images):
    job = parse_job(dict(BASE, task="score", criteria=[
        {"name": "red", "prompt": "Is it red?"},
        {"name": "quality", "prompt": "Rate it.", "scale": {"min": 1, "max": 5}},
        {"name": "what", "prompt": "What is it?", "labels": ["a red car", "a blue cup", "noise"]}]))
    batch = preprocessed(job, *images)
    want = rows_of(Score(job, engine=hf_engine)(batch))
    got = rows_of(asyncio.run(AsyncScore(job, engine=vllm_engine)(batch)))
    for key, row in want.items():
        for name in ("score_red", "score_quality", "rating_quality", "score_what"):
            assert got[key][name] == pytest.approx(row[name], abs=1e-4), (key, name)
        assert got[key]["label_what"] == row["label_what"]


def test_batches_in_flight_together_on_one_replica(vllm_engine, images):
    """Ray Data runs the async stage up to max_concurrent_batches times at once; the engine serves them together."""
    job = parse_job(dict(BASE, task="caption"))
    batch = preprocessed(job, *images)
    stage = AsyncGenerate(job, engine=vllm_engine)
    single = [{name: values[[k]] for name, values in batch.items()} for k in range(3)]
    def answers(table):
        return {key: (r["response"], r["num_generated_tokens"]) for key, r in rows_of(table).items()}

    alone = [answers(asyncio.run(stage(b))) for b in single]

    async def together():
        return await asyncio.gather(*(stage(b) for b in single))

    tables = asyncio.run(together())
    assert [answers(t) for t in tables] == alone
    spans = [t.column(BATCH_COLUMN)[0].as_py() for t in tables]
    assert max(s["start"] for s in spans) < min(s["end"] for s in spans)  # all three were in flight at one moment
    assert [s["samples"] for s in spans] == [1, 1, 1] and all(s["tokens"] == 8 for s in spans)


def test_sampled_rows_depend_only_on_seed_and_row_id(vllm_engine, images):
    job = parse_job(dict(BASE, task="caption", generation={"max_new_tokens": 8, "do_sample": True, "top_p": 0.95}))
    full = preprocessed(job, *images)

    def answers(job, keep):
        batch = {name: values[keep] for name, values in full.items()}
        return {k: r["response"] for k, r in rows_of(asyncio.run(AsyncGenerate(job, engine=vllm_engine)(batch))).items()}

    together = answers(job, [0, 1, 2])
    assert answers(job, [2]) == {"s2": together["s2"]}
    assert answers(job, [2, 0]) == {"s2": together["s2"], "s0": together["s0"]}
    assert answers(parse_job(job.model_dump(), overrides=["generation.seed=6"]), [0, 1, 2]) != together
    assert np.unique(list(together.values())).size == 3


def test_a_poison_sample_costs_one_row_on_vllm_too(vllm_engine, hf_engine, images):
    """One sample whose tile counts disagree with its pixels makes the engine raise: it becomes a model_error row,
    the batch's others get the transformers stage's answers."""
    from tests.unit.stages.test_poison import poisoned

    job = parse_job(dict(BASE, task="caption"))
    batch = preprocessed(job, *images)
    want = rows_of(Generate(job, engine=hf_engine)(batch))
    got = rows_of(asyncio.run(AsyncGenerate(job, engine=vllm_engine)(poisoned(batch, 1))))
    assert [got[f"s{i}"]["status"] for i in range(3)] == ["ok", "error", "ok"]
    assert got["s1"]["error_type"] == "model_error"
    assert [got[k]["response"] for k in ("s0", "s2")] == [want[k]["response"] for k in ("s0", "s2")]


def test_a_samples_questions_read_its_image_from_the_prefix_cache(vllm_engine, images):
    """3-question vqa samples, as the stage sends them: vLLM's own statistics (our stat logger) show each image's
    tokens prefilled once per sample, not once per question, for a 13-tile sample alone and for samples of 1, 7 and
    13 tiles in flight together (where the questions raced past the cache before a sample's first question went
    first: vllm_support.each_sample_prefilled_once); the batch's record carries the replica's figures."""
    folder, pictures = images
    job = parse_job(dict(BASE, task="vqa", questions=["Describe the image.", "What colour is it?", "Is it dark?"]))
    batch = preprocessed(job, folder, pictures)
    assert list(batch["num_tiles"]) == [1, 7, 13]
    stage = AsyncGenerate(job, engine=vllm_engine)
    tally = vllm_engine.prefix_cache
    block = vllm_engine.llm.vllm_config.cache_config.block_size

    def measured(run):
        assert vllm_engine._loop.run(vllm_engine.llm.reset_prefix_cache())  # no earlier test's blocks
        before = (tally.queries, tally.hits)
        tables = run()
        prompt_tokens = sum(r["num_input_tokens"] for t in tables for r in rows_of(t).values())
        assert tally.queries - before[0] == prompt_tokens  # every prompt token looked up once
        return tally.queries - before[0], tally.hits - before[1], tables

    async def together():
        return await asyncio.gather(*(stage({k: v[[i]] for k, v in batch.items()}) for i in range(3)))

    queries, hits, tables = measured(lambda: [asyncio.run(stage({k: v[[2]] for k, v in batch.items()}))])
    image_tokens = 13 * 256
    assert hits >= 0.6 * queries
    assert queries - hits >= image_tokens  # the first question prefilled the image ...
    assert hits >= 2 * (image_tokens - block)  # ... and the other two read it from the cache
    record = tables[0].column(BATCH_COLUMN)[0].as_py()
    assert (record["cache_queries"], record["cache_hits"]) == (tally.queries, tally.hits)
    print(f"\nprefix cache, 3 questions on a 13-tile image: {hits} of {queries} prompt tokens ({hits / queries:.1%})")

    queries, hits, _ = measured(lambda: asyncio.run(together()))
    assert hits >= 0.6 * queries and hits >= 2 * (21 * 256 - 3 * block)
    print(f"prefix cache, 3 questions on images of 1, 7 and 13 tiles in flight together: {hits} of {queries} prompt "
          f"tokens ({hits / queries:.1%})")


def test_prepare_runs_off_the_event_loop(vllm_engine, images, monkeypatch):
    """prepare() (chat template, tokenising) runs in the stage's own thread: the actor's event loop, which serves
    the other batches in flight, keeps running while a slow prepare works."""
    import threading
    import time

    job = parse_job(dict(BASE, task="caption"))
    batch = preprocessed(job, *images)
    stage = AsyncGenerate(job, engine=vllm_engine)
    seen = {}
    original = stage.prepare

    def slow_prepare(b):
        seen["thread"] = threading.current_thread()
        time.sleep(0.5)
        return original(b)

    monkeypatch.setattr(stage, "prepare", slow_prepare)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        table = await stage(batch)
        task.cancel()
        return table, ticks, threading.current_thread()

    table, ticks, loop_thread = asyncio.run(main())
    assert seen["thread"] is not loop_thread and seen["thread"].name.startswith("prepare")
    assert ticks >= 20  # the loop ran during the half-second prepare
    assert table.num_rows == 3
