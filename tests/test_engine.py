"""The model stage: prompts as transformers' InternVL processor builds them, and batched == one-at-a-time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, InternVLForConditionalGeneration

from pipeline.config import parse_job
from pipeline.engine import InternVLEngine, ModelLoadError, plan_device, resolve_checkpoint
from pipeline.stages import Generate
from pipeline.tiling import normalize_tiles, tile_image
from tests.conftest import pattern_image

MAX_NEW_TOKENS = 10
# 448x448 -> 1 tile; 1344x896 -> 3x2 grid + thumbnail = 7; 1792x1344 -> 4x3 grid + thumbnail = 13
SIZES = [(448, 448, 1), (1344, 896, 7), (1792, 1344, 13)]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return InternVLEngine.load(str(tiny_model), device="cpu")


@pytest.fixture(scope="module")
def samples():
    out = []
    for w, h, n in SIZES:
        tiles = tile_image(pattern_image(w, h))
        assert tiles.num_tiles == n
        out.append(tiles.pixels)
    return out


def reference_generate(model_dir, prompt: str, pixels: np.ndarray):
    """What a user of plain transformers does for one sample: processor-style expansion, cards' normalisation."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = InternVLForConditionalGeneration.from_pretrained(model_dir).eval()
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        tokenize=False, add_generation_prompt=True,
    )
    expanded = rendered.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * (256 * len(pixels)) + "</img>")
    enc = tok(expanded, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(
            **enc, pixel_values=torch.from_numpy(normalize_tiles(pixels)), max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False, output_logits=True, return_dict_in_generate=True,
        )
    tokens = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens)]
    return enc["input_ids"][0].tolist(), tokens, logprobs


def test_prompt_ids_match_processor_expansion(engine, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = len(tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
        tokenize=True, add_generation_prompt=True,
    )["input_ids"])
    for tiles in (1, 7, 13):
        ids = engine.prompt_ids("Describe.", [tiles])
        assert len(ids) == base - 1 + 2 + 256 * tiles
        assert ids.count(tok.convert_tokens_to_ids("<IMG_CONTEXT>")) == 256 * tiles


def test_normalize_on_device_equals_cards(engine, samples):
    for pixels in samples:
        assert torch.equal(engine.normalize(pixels), torch.from_numpy(normalize_tiles(pixels)))


def test_batched_equals_one_at_a_time(engine, tiny_model, samples):
    prompt = "Describe the image in detail."
    requests = [(engine.prompt_ids(prompt, [len(p)]), p) for p in samples]
    batched = engine.generate(requests, max_new_tokens=MAX_NEW_TOKENS)
    for (ids, pixels), got in zip(requests, batched):
        ref_ids, ref_tokens, ref_logprobs = reference_generate(tiny_model, prompt, pixels)
        assert ids == ref_ids
        assert got.token_ids == ref_tokens
        np.testing.assert_allclose(got.logprobs, ref_logprobs, atol=1e-4)
    # generated text differs between images: the output depends on the pixels
    assert len({tuple(g.token_ids) for g in batched}) == len(batched)


def test_generate_stage_rows(engine, samples, tmp_path):
    job = parse_job({"task": "vqa", "input": "x", "output": "y", "model": "m", "generation": {"max_new_tokens": 5}})
    stage = Generate(job, engine=engine)
    n = 3
    batch = {
        "id": np.array(["a", "b", "c"], dtype=object),
        "uri": np.array(["u1", "u2", "u3"], dtype=object),
        "question": np.array(["What?", None, "Why?"], dtype=object),
        "pixels": np.array([samples[0].tobytes(), samples[0].tobytes(), None], dtype=object),
        "num_tiles": np.array([1, 1, 0], dtype=np.int32),
        "width": np.array([448, 448, None], dtype=object),
        "height": np.array([448, 448, None], dtype=object),
        "status": np.array(["ok", "ok", "error"], dtype=object),
        "error_type": np.array([None, None, "decode_error"], dtype=object),
        "error_message": np.array([None, None, "broken"], dtype=object),
        "preprocess_ms": np.zeros(n),
    }
    table = stage(batch).to_pylist()
    assert [r["status"] for r in table] == ["ok", "error", "error"]
    assert [r["error_type"] for r in table] == [None, "bad_input", "decode_error"]
    assert table[0]["response"] and table[0]["num_generated_tokens"] == 5 and table[0]["prompt"] == "What?"
    assert table[0]["num_input_tokens"] == len(engine.prompt_ids("What?", [1]))
    assert "pixels" not in table[0]


def test_device_plan():
    cpu = plan_device("auto", "auto", cuda_available=False, flash_attn_available=False)
    assert (cpu.device, cpu.dtype, cpu.attn_implementation) == ("cpu", torch.float32, "sdpa")
    gpu = plan_device("auto", "auto", cuda_available=True, flash_attn_available=True)
    assert (gpu.device, gpu.dtype, gpu.attn_implementation) == ("cuda", torch.bfloat16, "flash_attention_2")
    assert plan_device("auto", "auto", cuda_available=True, flash_attn_available=False).attn_implementation == "sdpa"
    with pytest.raises(ModelLoadError, match="no CUDA"):
        plan_device("cuda", "auto", cuda_available=False, flash_attn_available=False)


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        resolve_checkpoint("./no-such-model-dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_checkpoint(str(tmp_path / "empty"))


class _OomOnBatches:
    """An engine stand-in whose device 'runs out of memory' for batches of more than one sample, or for 13 tiles."""

    def __init__(self, real):
        self.real = real
        self.calls = []

    def prompt_ids(self, text, tiles):
        return self.real.prompt_ids(text, tiles)

    def generate(self, requests, **kw):
        self.calls.append(len(requests))
        if len(requests) > 1 or len(requests[0][1]) == 13:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.real.generate(requests, **kw)


def test_out_of_memory_falls_back_to_single_samples(engine, samples):
    job = parse_job({"task": "caption", "input": "x", "output": "y", "model": "m", "generation": {"max_new_tokens": 3}})
    fake = _OomOnBatches(engine)
    n = len(samples)
    batch = {
        "id": np.array([str(i) for i in range(n)], dtype=object),
        "uri": np.array([f"u{i}" for i in range(n)], dtype=object),
        "pixels": np.array([p.tobytes() for p in samples], dtype=object),
        "num_tiles": np.array([len(p) for p in samples], dtype=np.int32),
        "width": np.zeros(n), "height": np.zeros(n),
        "status": np.array(["ok"] * n, dtype=object),
        "error_type": np.array([None] * n, dtype=object),
        "error_message": np.array([None] * n, dtype=object),
        "preprocess_ms": np.zeros(n),
    }
    rows = Generate(job, engine=fake)(batch).to_pylist()
    assert fake.calls == [3, 1, 1, 1]
    assert [r["status"] for r in rows] == ["ok", "ok", "error"]
    assert rows[2]["error_type"] == "model_error" and "out of device memory" in rows[2]["error_message"]
