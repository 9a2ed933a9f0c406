"""Visual-token arithmetic: tile counts, what fits a per-sample budget, packing model calls by padded tokens."""

from __future__ import annotations

import itertools

import pytest

from pipeline.media.budget import frames_within, max_tiles_within, tile_count
from pipeline.model.batching import equal_length_groups, pack_calls


def test_tile_count_matches_the_cards_grid_plus_thumbnail():
    assert tile_count(448, 448, min_tiles=1, max_tiles=12, thumbnail=True) == 1  # one tile: no thumbnail
    assert tile_count(4032, 3024, min_tiles=1, max_tiles=12, thumbnail=True) == 13  # 4x3 grid + thumbnail
    assert tile_count(4032, 3024, min_tiles=1, max_tiles=12, thumbnail=False) == 12
    assert tile_count(1920, 1080, min_tiles=1, max_tiles=6, thumbnail=True) == 3  # 2x1 is the closest aspect


@pytest.mark.parametrize("size", [(4032, 3024), (1920, 1080), (800, 1200), (3000, 1000), (640, 480)])
@pytest.mark.parametrize("tokens", [256, 768, 1024, 2048, 3328])
def test_budget_gives_the_most_tiles_that_fit(size, tokens):
    w, h = size
    setting = max_tiles_within(w, h, tokens=tokens, min_tiles=1, max_tiles=12, thumbnail=True)
    assert setting is not None
    n = tile_count(w, h, min_tiles=1, max_tiles=setting, thumbnail=True)
    assert n * 256 <= tokens
    # no other setting fits more tiles
    others = [tile_count(w, h, min_tiles=1, max_tiles=m, thumbnail=True) for m in range(1, 13)]
    assert n == max(c for c in others if c * 256 <= tokens)


def test_budget_below_min_tiles_is_none():
    assert max_tiles_within(4032, 3024, tokens=512, min_tiles=4, max_tiles=12, thumbnail=True) is None


def test_frames_within_budget():
    assert frames_within(8, tokens=8 * 256, tiles_per_frame=1, thumbnail=True) == 8
    assert frames_within(8, tokens=5 * 256 + 100, tiles_per_frame=1, thumbnail=True) == 5
    assert frames_within(32, tokens=16 * 256, tiles_per_frame=4, thumbnail=True) == 3  # 5 tiles a frame
    assert frames_within(8, tokens=256, tiles_per_frame=1, thumbnail=True) == 1
    assert frames_within(8, tokens=1000, tiles_per_frame=4, thumbnail=True) == 0  # 5 tiles a frame: none fits


def test_pack_calls_groups_similar_lengths_within_budget():
    lengths = [300, 3400, 310, 1800, 320, 3390, 1790, 305]
    groups = pack_calls(lengths, max_tokens=7000)
    assert sorted(itertools.chain(*groups)) == list(range(len(lengths)))  # every item exactly once
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 7000 or len(g) == 1
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert padded < 0.6 * len(lengths) * max(lengths)  # far less padding than one call
    assert pack_calls(lengths, max_tokens=None) == [list(range(len(lengths)))]  # packing off: one call
    assert pack_calls([300, 310, 305], max_tokens=10**9) == [[0, 2, 1]]  # similar lengths: one call
    loose = pack_calls(lengths, max_tokens=10**9)  # a loose budget: still no call padded by more than 25%
    for g in loose:
        assert len(g) * max(lengths[i] for i in g) <= 1.25 * sum(lengths[i] for i in g)
    assert pack_calls([5000], max_tokens=100) == [[0]]  # too long for the budget: alone
    assert pack_calls([], max_tokens=10) == []


def test_equal_length_groups():
    assert equal_length_groups([30, 50, 30, 40, 50]) == [[0, 2], [1, 4], [3]]
    assert equal_length_groups([]) == []


def test_pack_calls_counts_every_question_of_a_sample():
    groups = pack_calls([100, 100, 100], max_tokens=400, sizes=[3, 1, 1])
    assert sorted(itertools.chain(*groups)) == [0, 1, 2]
    for g in groups:
        assert sum([3, 1, 1][i] for i in g) * 100 <= 400


def test_in_calls_keeps_prompt_order_and_each_sample_with_its_prompts():
    import numpy as np

    from pipeline.model.batching import in_calls
    from pipeline.model.requests import PromptRequest

    samples = [np.zeros((n, 1)) for n in (1, 7, 3, 13)]
    owners = [0, 1, 1, 2, 3, 3, 3]
    requests = [PromptRequest([0] * (256 * len(samples[o]) + k), o, [[k]]) for k, o in enumerate(owners)]
    calls = []

    def call(reqs, s):
        calls.append(len(s))
        return [(len(r.ids), len(s[r.sample]), r.labels) for r in reqs]

    whole = call(requests, samples)
    calls.clear()
    packed = in_calls(call, requests, samples, max_tokens=4000)
    assert packed == whole and len(calls) > 1 and sum(calls) == 4  # each sample in exactly one call


def test_preprocess_fits_each_sample_to_the_token_budget(tmp_path):
    from pipeline.config import parse_job
    from pipeline.stages.preprocess import Preprocess
    from tests.conftest import pattern_image
    from tests.media import make_video

    pattern_image(4032, 3024).save(tmp_path / "big.jpg")
    pattern_image(448, 448).save(tmp_path / "small.jpg")  # one tile: within any budget
    (tmp_path / "clip.mp4").write_bytes(make_video(40, 10))
    job = {"task": "caption", "input": str(tmp_path), "output": str(tmp_path / "out"), "model": "m"}
    full = Preprocess(parse_job(job))
    fitted = Preprocess(parse_job({**job, "tiling": {"max_tokens_per_sample": 1280}, "video": {"num_frames": 16}}))
    assert full.prepare(str(tmp_path / "big.jpg"))["num_tiles"] == 13
    big = fitted.prepare(str(tmp_path / "big.jpg"))
    assert big["num_tiles"] == 5  # the most tiles within 1280 tokens: a 2x2 grid + thumbnail
    assert fitted.prepare(str(tmp_path / "small.jpg"))["num_tiles"] == full.prepare(str(tmp_path / "small.jpg"))["num_tiles"]
    clip = fitted.prepare(str(tmp_path / "clip.mp4"))
    assert (len(clip["frame_indices"]), clip["num_tiles"]) == (5, 5)  # 5 sampled frames x 256 tokens
    pair = fitted.prepare(str(tmp_path / "big.jpg"), [str(tmp_path / "big.jpg"), str(tmp_path / "small.jpg")])
    assert pair["num_tiles"] * 256 <= 1280


def test_a_video_whose_one_frame_exceeds_the_budget_is_too_large(tmp_path):
    """As for an image over the budget even at min_tiles: a video one frame of which (tiles_per_frame tiles plus
    the thumbnail) exceeds the budget becomes a too_large row, instead of one frame over the budget."""
    from pipeline.config import parse_job
    from pipeline.stages.preprocess import Preprocess
    from tests.media import make_video

    (tmp_path / "clip.mp4").write_bytes(make_video(20, 10, width=640, height=360))
    job = parse_job({"task": "caption", "input": str(tmp_path), "output": str(tmp_path / "out"), "model": "m",
                     "tiling": {"max_tokens_per_sample": 1000}, "video": {"num_frames": 4, "tiles_per_frame": 4}})
    row = Preprocess(job).prepare(str(tmp_path / "clip.mp4"))
    assert (row["status"], row["error_type"]) == ("error", "too_large")
    assert "one frame" in row["error_message"] and "1000 visual tokens" in row["error_message"]
