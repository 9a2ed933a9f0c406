"""`compute.engine: vllm-native`, vLLM's own InternVL path (the baseline Ray Data LLM runs): a job on the trained tiny
model answers what the pictures show, through the same stages and columns; and how vLLM's tiles differ from the
cards' on the spec's tiling cases (tests/data/tiling_cases.json), recorded as figures (docs/vllm-native.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")

import yaml  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from pipeline.cli import app  # noqa: E402
from pipeline.embedded import meaning as M  # noqa: E402
from pipeline.embedded.tiny_model import make_tiny_model  # noqa: E402
from pipeline.media.tiling import IMAGENET_STD, TILE_SIZE, normalize_tiles, tile_image  # noqa: E402
from tests.conftest import DATA, pattern_image  # noqa: E402
from tests.helpers import read_output  # noqa: E402
from tests.vllm.conftest import ENGINE_OPTIONS  # noqa: E402

pytestmark = pytest.mark.vllm

CASES = json.loads((DATA / "tiling_cases.json").read_text())["cases"]
IMAGES, VIDEOS = 13, 4  # every tile count 1..13 once; every direction once


def vllm_processor(path: Path):
    """vLLM's own processing of an image, as its InternVL path runs it on the engine's front end (interns1's
    _apply_hf_processor_main: the checkpoint's processor, called per image through the processing context with the
    request's mm_processor_kwargs)."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    info = MULTIMODAL_REGISTRY.get_processing_info(ModelConfig(model=str(path), tokenizer=str(path), dtype="float32"))
    processor = info.get_hf_processor()

    def process(image, **kwargs) -> np.ndarray:
        out = info.ctx.call_hf_processor(processor, dict(text=processor.image_token, images=image), kwargs)
        return out["pixel_values"].numpy()

    return process


def test_vllm_tiles_against_the_cards_on_the_spec_cases(tiny_model, figures):
    """Per spec case (pattern image, max/min tiles, thumbnail): the grid vLLM's processor picks (transformers'
    get_optimal_tiled_canvas, as its GotOcr2 processor does), its tile count, and where the counts agree the pixel
    differences from the cards' tiles, in 0-255 levels (its normalised floats turned back with ImageNet's std)."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    process = vllm_processor(tiny_model)
    std = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(1, 3, 1, 1)
    grids_differ, counts_differ, means, maxima = [], [], [], []
    for case in CASES:
        w, h, low, high = case["width"], case["height"], case["min_num"], case["max_num"]
        image = pattern_image(w, h)
        theirs = process(image, min_patches=low, max_patches=high)
        grid = get_optimal_tiled_canvas((h, w), (TILE_SIZE, TILE_SIZE), low, high)
        if tuple(grid) != (case["grid_cols"], case["grid_rows"]):
            grids_differ.append(case)
        if len(theirs) != case["num_tiles"]:
            counts_differ.append(case)
            continue
        ours = normalize_tiles(tile_image(image, min_tiles=low, max_tiles=high, thumbnail=case["use_thumbnail"]).pixels)
        levels = np.abs(theirs - ours) * std * 255
        means.append(float(levels.mean()))
        maxima.append(float(levels.max()))
    # vLLM's processor (crop_to_patches) always adds the thumbnail to a multi-tile grid: the cards' thumbnail=False
    # cases of more than one tile are the only count differences; the grids agree on every case.
    assert not grids_differ
    assert all(not c["use_thumbnail"] and c["grid_cols"] * c["grid_rows"] > 1 for c in counts_differ)
    assert len(counts_differ) == sum(not c["use_thumbnail"] and c["grid_cols"] * c["grid_rows"] > 1 for c in CASES)
    figures("vllm-native tiles: spec cases", len(CASES))
    figures("vllm-native tiles: grids differing from the cards'", len(grids_differ))
    figures("vllm-native tiles: tile counts differing (thumbnail: false)", len(counts_differ))
    figures("vllm-native tiles: mean |pixel diff| (0-255), worst case", max(means))
    figures("vllm-native tiles: mean |pixel diff| (0-255), over cases", float(np.mean(means)))
    figures("vllm-native tiles: max |pixel diff| (0-255)", max(maxima))
    assert max(means) < 1.0  # resampling differences, not another picture


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("trained") / "model", trained=True)


def run_job(tmp_path: Path, job: dict):
    path = tmp_path / f"{Path(job['output']).name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return CliRunner().invoke(app, ["run", str(path)])


def test_a_native_job_answers_what_the_trained_model_sees(ray_local, trained, tmp_path, figures):
    """vqa over images of every tile count (1..13) and videos, through `internvl-batch run` with compute.engine
    vllm-native: vLLM tiles the pictures and encodes them in its own process; the answers are the truth of the drawn
    world as often as on our path (transformers engine, the cards' tiles), and the output columns are the same."""
    truth = M.draw_eval_set(tmp_path / "world", images=IMAGES, pairs=0, videos=VIDEOS)
    base = M.vqa_job(str(truth.folder / "singles.jsonl"), "", str(trained))
    native = dict(base, output=str(tmp_path / "native"), compute={
        "batch_size": 4, "engine": "vllm-native", "device": "cpu",
        "vllm": dict(ENGINE_OPTIONS, max_concurrent_batches=2)})
    result = run_job(tmp_path, native)
    assert result.exit_code == 0, result.output
    assert "vllm-native replica(s)" in result.output
    ours = dict(base, output=str(tmp_path / "ours"), compute={"batch_size": 4, "engine": "transformers"})
    assert run_job(tmp_path, ours).exit_code == 0

    got, want = read_output(native["output"]).to_pylist(), read_output(ours["output"]).to_pylist()
    assert read_output(native["output"]).schema == read_output(ours["output"]).schema
    assert {r["status"] for r in got} == {"ok"} and len(got) == len(want) == IMAGES * 4 + VIDEOS * 2
    native_scores, our_scores = M.answer_metrics(got, truth), M.answer_metrics(want, truth)
    same = {r["id"]: r["response"] for r in want}
    agree = float(np.mean([r["response"] == same[r["id"]] for r in got]))
    for name, value in native_scores.items():
        if not name.startswith("n_"):
            figures(f"vllm-native answers on the trained model: {name}", value)
            figures(f"our answers on the trained model: {name}", our_scores[name])
    figures("vllm-native answers equal to ours", agree)
    by_id = {r["id"]: r for r in want}  # the cards' tile counts and prompt lengths, computed by the CPU stage
    assert all((r["num_tiles"], r["num_input_tokens"]) == (by_id[r["id"]]["num_tiles"], by_id[r["id"]]["num_input_tokens"])
               for r in got)
    for name in ("caption", "shape", "color", "background", "video_caption", "direction"):
        assert native_scores[name] >= our_scores[name] - 0.15, (name, native_scores, our_scores)
