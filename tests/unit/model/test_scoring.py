"""Scores are label probabilities from the model's logits: exact against a direct computation, batch-invariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import parse_job
from pipeline.media.tiling import normalize_tiles
from pipeline.model.transformers_engine import InternVLEngine
from pipeline.model.scoring import evaluate, histogram, label_token_ids, normalize, passes
from pipeline.stages.preprocess import Preprocess
from pipeline.stages.score import Score
from tests.conftest import pattern_image
from tests.helpers import vision_calls
from tests.media import make_video
from tests.helpers import numpy_batch

BASE = {"task": "score", "input": "x", "output": "y", "model": "m"}


@pytest.fixture(scope="module")
def engine(tiny_model):
    return InternVLEngine.load(str(tiny_model), device="cpu")


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Two images (1 and 7 tiles), a 4-frame video and a missing file, through the CPU stage."""
    folder = tmp_path_factory.mktemp("score-media")
    pattern_image(448, 448).save(folder / "a.png")
    pattern_image(1344, 896).save(folder / "b.png")
    (folder / "c.mp4").write_bytes(make_video(24, 12, width=320, height=240))
    job = parse_job({**BASE, "prompt": "Is it blurry?", "video": {"num_frames": 4}})
    uris = [str(folder / n) for n in ["a.png", "b.png", "c.mp4", "missing.png"]]
    return numpy_batch(Preprocess(job)({"id": np.array(["a", "b", "c", "d"], dtype=object),
                                        "uri": np.array(uris, dtype=object)}))


def reference_scores(engine, prompt: str, pixels: np.ndarray, tiles: list[int], video: bool, labels: list[str],
                     *, with_end: bool = True):
    """Softmax over label sequences from full forward passes of prompt + label, one sample and one label at a time:
    each label's tokens, then the end of the answer (any of the eos ids: here the tiny model's <|im_end|>).
    with_end=False is the old definition, the label's tokens alone."""
    prompt_ids = engine.prompt_ids(prompt, tiles, video=video)
    ends = sorted(engine.eos_ids)
    assert ends == [engine.tokenizer.convert_tokens_to_ids("<|im_end|>")]  # the end of the assistant's turn
    logps = []
    for seq in label_token_ids(engine.tokenizer, labels):
        ids = torch.tensor([prompt_ids + seq])
        with torch.inference_mode():
            logits = engine.model(input_ids=ids, pixel_values=torch.from_numpy(normalize_tiles(pixels))).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        total = sum(float(logp[len(prompt_ids) - 1 + t, tok]) for t, tok in enumerate(seq))
        if with_end:
            total += float(torch.logsumexp(logp[len(prompt_ids) - 1 + len(seq), ends], dim=0))
        logps.append(total)
    return normalize(logps)


def pixels_of(batch, i):
    from pipeline.media.decode import tiles_from_bytes

    return tiles_from_bytes(batch["pixels"][i], int(batch["num_tiles"][i]))


@pytest.mark.parametrize("labels", [["a", "0"], ["yes", "no"], ["red", "blue", "a"]], ids=["single-token", "multi-token", "mixed"])
def test_scores_equal_direct_softmax_over_label_sequences(engine, batch, labels):
    job = parse_job({**BASE, "prompt": "Is it blurry?", "labels": labels, "video": {"num_frames": 4}})
    rows = Score(job, engine=engine)(batch).to_pylist()
    for i, row in enumerate(rows[:3]):
        video = row["media_type"] == "video"
        ref = reference_scores(engine, "Is it blurry?", pixels_of(batch, i), row["tiles_per_image"], video, labels)
        got = dict(row["label_probs"])
        np.testing.assert_allclose([got[label] for label in labels], ref, atol=1e-5)
        assert row["score"] == pytest.approx(ref[0], abs=1e-5)
        assert row["label"] == labels[int(np.argmax(ref))] == row["response"]
    assert rows[3]["status"] == "error" and rows[3]["score"] is None


def test_a_label_that_is_a_prefix_of_another_is_not_biased(engine, batch):
    """A 1-10 scale: "1" is one token and "10" is "1" then "0". Scored as the whole answer (the end of the answer
    included), "10" is compared with "1"-and-stop, not with "1"-followed-by-anything, which made P("10") <= P("1")."""
    ids = label_token_ids(engine.tokenizer, ["1", "10"])
    assert ids[1][: len(ids[0])] == ids[0]  # a real prefix pair in this tokenizer
    job = parse_job({**BASE, "prompt": "Rate it from 1 to 10.", "labels": ["1", "10"], "video": {"num_frames": 4}})
    rows = Score(job, engine=engine)(batch).to_pylist()
    for i, row in enumerate(rows[:3]):
        args = (engine, "Rate it from 1 to 10.", pixels_of(batch, i), row["tiles_per_image"], row["media_type"] == "video",
                ["1", "10"])
        got = dict(row["label_probs"])
        np.testing.assert_allclose([got["1"], got["10"]], reference_scores(*args), atol=1e-5)
        old = reference_scores(*args, with_end=False)
        assert old[1] <= old[0] and not np.isclose(got["10"], old[1], rtol=1e-2, atol=0)  # the old, biased ones differ


def test_batched_and_single_sample_scores_agree(engine, batch):
    job = parse_job({**BASE, "prompt": "Is it blurry?", "video": {"num_frames": 4}})
    stage = Score(job, engine=engine)
    together = stage(batch).to_pylist()
    for i in range(3):
        alone = stage({k: v[i:i + 1] for k, v in batch.items()}).to_pylist()[0]
        assert alone["score"] == pytest.approx(together[i]["score"], abs=1e-5)


def test_criteria_ratings_and_filter(engine, batch):
    job = parse_job({**BASE, "video": {"num_frames": 4}, "criteria": [
        {"name": "blurry", "prompt": "Is it blurry?", "filter": {"max_score": 0.99}},
        {"name": "aesthetic", "prompt": "Rate the aesthetic quality 0-9.", "scale": {"min": 0, "max": 9},
         "filter": {"min_rating": 0}},
    ]})
    with vision_calls(engine) as calls:
        rows = Score(job, engine=engine)(batch).to_pylist()
    assert calls == [1 + 7 + 4]  # the vision tower ran once over the three samples, for both criteria
    row = rows[0]
    probs = dict(row["label_probs_aesthetic"])
    assert sorted(probs) == [str(d) for d in range(10)] and sum(probs.values()) == pytest.approx(1.0)
    assert row["rating_aesthetic"] == pytest.approx(sum(int(k) * p for k, p in probs.items()))
    assert row["score_aesthetic"] == pytest.approx(row["rating_aesthetic"] / 9)
    assert 0 <= row["score_blurry"] <= 1 and row["label_blurry"] in ("yes", "no")
    assert [r["passed"] for r in rows] == [True, True, True, False]  # the error row never passes
    ref = reference_scores(engine, "Rate the aesthetic quality 0-9.", pixels_of(batch, 1), rows[1]["tiles_per_image"],
                           False, [str(d) for d in range(10)])
    np.testing.assert_allclose([dict(rows[1]["label_probs_aesthetic"])[str(d)] for d in range(10)], ref, atol=1e-5)


def test_pure_helpers():
    assert normalize([0.0, 0.0]) == [0.5, 0.5]
    job = parse_job({**BASE, "prompt": "q", "scale": {"min": 1, "max": 3}})
    out = evaluate(job.score_criteria()[0], [np.log(0.2), np.log(0.3), np.log(0.5)])
    assert out["rating"] == pytest.approx(2.3) and out["score"] == pytest.approx(0.65) and out["label"] == "3"
    rule = parse_job({**BASE, "prompt": "q", "filter": {"min_score": 0.5}}).filter
    assert passes(rule, score=0.5) and not passes(rule, score=0.49) and not passes(rule, score=None)
    assert passes(None, score=None)
    assert histogram([0.0, 0.05, 0.5, 1.0, None]) == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]


def test_labels_that_tokenise_alike_are_refused(engine):
    with pytest.raises(ValueError, match="distinct"):
        label_token_ids(engine.tokenizer, ["yes", "yes "[:3]])
