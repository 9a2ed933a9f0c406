"""The trained tiny model's answers mean something, through the real pipeline (local Ray, SeaweedFS S3, Parquet).

Freshly drawn held-out samples of the world (pipeline/embedded/world): images of every tile count 1..13, JPEG and
PNG, every shape / colour / background; image pairs; videos moving in each direction. Their answers are compared
with the truth. A sabotaged run (tiles of one sample swapped with another's, video frames reversed, between the
pipeline's own CPU and model stages) must collapse, so these checks can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import s3fs

from pipeline.config import parse_job
from pipeline.embedded import meaning as M
from pipeline.embedded.tiny_model import make_tiny_model
from tests.helpers import read_output

pytestmark = pytest.mark.integration

IMAGES, PAIRS, VIDEOS = 27, 10, 12  # one miss allowed per question (26 / 27 >= 0.95), pair (9 / 10), direction (11 / 12)

# The targets, asserted on the committed checkpoint (README: the figures measured).
TARGETS = {"caption": 0.90, "question": 0.95, "pair": 0.90, "direction": 0.90, "video_caption": 0.85,
           "auc": 0.98, "filter": 0.95}
SABOTAGE_DROP = {"caption": 0.5, "shape": 0.5, "color": 0.5, "direction": 0.5}


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("trained") / "model", trained=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3_server, ray_local, trained_model):
    folder = tmp_path_factory.mktemp("world")
    truth = M.draw_eval_set(folder, images=IMAGES, pairs=PAIRS, videos=VIDEOS)
    fs = s3fs.S3FileSystem()
    fs.put(str(folder) + "/", "bucket/meaning/in/", recursive=True)
    fs.put(str(trained_model) + "/", "bucket/meaning/model/", recursive=True)
    return truth, fs


def _run(job: dict, tmp_path) -> None:
    from pipeline.run.runner import run_job

    run_job(parse_job({**job, "model_cache": str(tmp_path / "cache")}, source="test"), echo=lambda _: None)


@pytest.fixture(scope="module")
def answers(world, tmp_path_factory):
    truth, fs = world
    tmp = tmp_path_factory.mktemp("answers")
    rows = []
    for name in ("singles", "pairs"):
        out = f"s3://bucket/meaning/{name}/"
        _run(M.vqa_job(f"s3://bucket/meaning/in/{name}.jsonl", out, "s3://bucket/meaning/model/"), tmp)
        rows += read_output(out.removeprefix("s3://"), fs).to_pylist()
    return rows


def test_the_encoder_sees_the_shape(trained_model):
    """The committed checkpoint's encoder (constructed features + trained shape classifier), as the pipeline runs
    it: shape logits of held-out thumbnails / single tiles, every tile count."""
    import torch
    from transformers import InternVLForConditionalGeneration

    from pipeline.embedded import world as W
    from pipeline.media.images import load_tiles
    from pipeline.media.tiling import normalize_tiles
    from training import seeing as S

    model = InternVLForConditionalGeneration.from_pretrained(trained_model, dtype=torch.float32).eval()
    rng = np.random.default_rng([M.EVAL_SEED, 7])
    hits = []
    for i in range(18):
        d = W.draw_image(rng, tiles=W.TILE_COUNTS[i % 9], shape=W.SHAPES[i % 3])
        tile = load_tiles(d.data, max_tiles=12).pixels[-1:]
        with torch.no_grad():
            h = S.vision_tokens(model.model.vision_tower, torch.from_numpy(normalize_tiles(tile)))
        hits.append(int(h[0, 1, S.C_SHAPE:S.C_SHAPE + 3].argmax()) == W.SHAPES.index(d.scene.shape))
    assert np.mean(hits) >= 0.95, hits


def test_answers_through_the_pipeline(world, answers):
    truth, _ = world
    assert all(r["status"] == "ok" for r in answers)
    tiles = {r["num_tiles"] for r in answers if r["media_type"] == "image"}
    assert tiles == {1, 3, 4, 5, 7, 9, 10, 11, 13}  # every tile count the defaults give
    m = M.answer_metrics(answers, truth)
    print("answers:", M.format_metrics(m))
    assert m["n_caption"] == IMAGES and m["n_pair"] == PAIRS and m["n_direction"] == VIDEOS
    floor = TARGETS
    assert m["caption"] >= floor["caption"]
    assert min(m["shape"], m["color"], m["background"]) >= floor["question"]
    assert m["pair"] >= floor["pair"]
    assert m["direction"] >= floor["direction"] and m["video_caption"] >= floor["video_caption"]


def test_scores_and_filter_through_the_pipeline(world, tmp_path):
    truth, fs = world
    out = "s3://bucket/meaning/scores/"
    _run(M.score_job("s3://bucket/meaning/in/images.jsonl", out, "s3://bucket/meaning/model/", keep="red",
                     output_passed="s3://bucket/meaning/passed/"), tmp_path)
    rows = read_output(out.removeprefix("s3://"), fs).to_pylist()
    m = M.score_metrics(rows, truth, keep="red")
    print("scores:", M.format_metrics(m))
    assert m["n_scored"] == IMAGES
    floor = TARGETS
    assert m["auc_pooled"] >= floor["auc"]
    assert m["filter_precision"] >= floor["filter"] and m["filter_recall"] >= floor["filter"]


def test_sabotaged_tiles_and_frames_collapse(world, trained_model):
    """The pipeline's own stages in-process, broken between them on purpose: each image gets the tiles of the next
    image with another shape and colour (same tile count), each video its frames in reverse order."""
    from pipeline.model.transformers_engine import InternVLEngine
    from pipeline.stages.generate import Generate
    from pipeline.stages.preprocess import Preprocess

    truth, _ = world
    folder = truth.folder
    job = parse_job(M.vqa_job(str(folder / "singles.jsonl"), str(folder / "out"), str(trained_model)), source="test")
    rows = [r for r in truth.rows if "uri" in r]
    images = [r for r in rows if truth.kinds[r["id"]] == "image"][:18]
    videos = [r for r in rows if truth.kinds[r["id"]] == "video"][:6]
    batch = {"id": [r["id"] for r in images + videos], "uri": [str(folder / r["uri"]) for r in images + videos],
             "questions": [r["questions"] for r in images + videos]}
    pre = Preprocess(job)(batch).to_pydict()
    engine = InternVLEngine.load(str(trained_model))
    generate = Generate(job, engine)

    def accuracy(table: dict) -> dict[str, float]:
        return M.answer_metrics(generate(table).to_pylist(), truth)

    honest = accuracy(pre)
    sabotaged = {k: list(v) for k, v in pre.items()}
    n = len(images)
    for i in range(n):  # the tiles of image i + 9: the same tile count, another shape and colour (draw_eval_set)
        j = (i + 9) % n
        assert pre["num_tiles"][i] == pre["num_tiles"][j]
        sabotaged["pixels"][i] = pre["pixels"][j]
    for i in range(n, n + len(videos)):
        frames = np.frombuffer(pre["pixels"][i], np.uint8).reshape(pre["num_tiles"][i], -1)
        sabotaged["pixels"][i] = frames[::-1].tobytes()
    broken = accuracy(sabotaged)
    print("honest:", M.format_metrics(honest), "\nsabotaged:", M.format_metrics(broken))
    # each check's honest accuracy is well above what the sabotage leaves (another sample's pixels: another shape
    # and colour; reversed frames: the opposite direction)
    for key in ("caption", "shape", "color", "direction"):
        assert broken[key] <= honest[key] - SABOTAGE_DROP[key], key
