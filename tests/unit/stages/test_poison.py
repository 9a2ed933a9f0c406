"""A sample the model raises on, or a prompt longer than the model's context, costs its own row only."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import parse_job
from pipeline.model.transformers_engine import InternVLEngine
from pipeline.stages.generate import Generate
from pipeline.stages.poison_guard import PoisonGuard
from pipeline.stages.score import Score
from tests.conftest import pattern_image
from tests.helpers import job_dict, preprocessed

SIZES = [(448, 448), (1344, 896), (896, 448), (640, 480)]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return InternVLEngine.load(str(tiny_model), device="cpu")


def poisoned(batch, row: int):
    """The batch with one row's tile counts made to disagree with its pixels: its prompt then asks for more image
    tokens than its tiles give, and the engine raises on it (a real failure of the model call, not a stand-in)."""
    table = dict(batch)
    tiles = [np.array(t) for t in table["tiles_per_image"]]
    tiles[row] = tiles[row] + 1
    table["tiles_per_image"] = np.array(tiles + [None], dtype=object)[:-1]
    return table


def rows_of(stage, batch):
    return {r["id"]: r for r in stage(batch).to_pylist()}


def test_a_poison_sample_is_one_error_row_and_the_rest_equal_running_alone(engine, tmp_path):
    job = parse_job(job_dict("caption", generation={"max_new_tokens": 4}))
    batch = preprocessed(job, tmp_path, {f"{i}.png": pattern_image(w, h) for i, (w, h) in enumerate(SIZES)})
    stage = Generate(job, engine=engine)
    with pytest.raises(Exception):  # the poisoned sample alone: the engine really raises
        engine.generate(*_call_args(stage, poisoned(batch, 2), only=2))
    rows = rows_of(stage, poisoned(batch, 2))
    assert [rows[f"s{i}"]["status"] for i in range(4)] == ["ok", "ok", "error", "ok"]
    assert rows["s2"]["error_type"] == "model_error" and "the model failed on this sample" in rows["s2"]["error_message"]
    clean = rows_of(stage, batch)
    for i in (0, 1, 3):  # the others: what the unpoisoned batch gives them (batched equals one at a time)
        assert rows[f"s{i}"]["response"] == clean[f"s{i}"]["response"]


def _call_args(stage, batch, only: int):
    rows, todo = stage.prepare(batch)
    keep = [k for k, r in enumerate(todo.requests) if r.sample == only]
    (prompts, samples, owners), kwargs = stage.call_args([todo.requests[k] for k in keep], todo.samples)
    return prompts, [samples[only]], [0] * len(prompts)


def test_a_prompt_longer_than_the_context_is_too_long_before_the_model_is_called(engine, tmp_path, monkeypatch):
    job = parse_job(job_dict("vqa", generation={"max_new_tokens": 4}))
    long_question = "Describe " + "this very long question " * 40
    extra = {"question": np.array(["What is it?", long_question, "Colours?"], dtype=object)}
    batch = preprocessed(job, tmp_path, {f"{i}.png": pattern_image(w, h) for i, (w, h) in enumerate(SIZES[:3])}, extra)
    stage = Generate(job, engine=engine)
    short = len(engine.prompt_ids(long_question, [7])) - 10
    monkeypatch.setattr(engine, "max_context", short)  # a model whose context the long question overflows
    calls = []
    real = engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompts, *a, **k: calls.append(len(prompts)) or real(prompts, *a, **k))
    rows = rows_of(stage, batch)
    assert [rows[f"s{i}"]["status"] for i in range(3)] == ["ok", "error", "ok"]
    assert rows["s1"]["error_type"] == "too_long" and f"model's context of {short}" in rows["s1"]["error_message"]
    assert calls == [2]  # the too-long prompt never reached the model
    score = parse_job(job_dict("score", prompt=long_question, labels=["yes", "no"]))
    scored = Score(score, engine=engine)(preprocessed(score, tmp_path, {"a.png": pattern_image(1344, 896)})).to_pylist()
    assert scored[0]["error_type"] == "too_long"


def test_a_model_that_fails_on_everything_still_stops_the_job():
    from pipeline.errors import ErrorType
    from pipeline.model.requests import Failure

    guard = PoisonGuard(limit=3)
    broken = [Failure(ErrorType.MODEL_ERROR, "x", failed=ValueError(f"bad {k}")) for k in range(2)]
    guard.check(["served", broken[0]])  # a sample served: the count starts again (1)
    guard.check([broken[1]])
    with pytest.raises(RuntimeError, match="failed on 4 samples in a row.*ValueError: bad 1"):
        guard.check([broken[1], Failure(ErrorType.MODEL_ERROR, "y", failed=ValueError("bad 2"))])
    with pytest.raises(RuntimeError, match="failed on 2 samples in a row"):  # none served yet: two are enough
        PoisonGuard().check(broken)
    PoisonGuard(limit=1).check([Failure(ErrorType.MODEL_ERROR, "out of memory")])  # memory is not poison


def test_tp_that_does_not_divide_the_heads_is_refused_at_load(tiny_model, tiny_model_tp):
    from pipeline.errors import ModelLoadError
    from pipeline.model.transformers_engine import require_divisible_heads

    with pytest.raises(ModelLoadError, match=r"cannot be split over compute.tp=2 ranks: .*1 key/value heads"):
        require_divisible_heads("tiny", str(tiny_model), 2)  # the default tiny model: 2 heads, 1 kv head
    require_divisible_heads("tiny", str(tiny_model_tp), 2)  # 4 heads, 2 kv heads
