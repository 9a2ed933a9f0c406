"""The model stage: prompts as transformers' InternVL processor builds them, and batched == one-at-a-time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, InternVLForConditionalGeneration

from pipeline.config import parse_job
from pipeline.errors import ModelLoadError
from pipeline.media.tiling import normalize_tiles, tile_image
from pipeline.model.batching import equal_length_groups
from pipeline.model.checkpoints import resolve_checkpoint
from pipeline.model.device import plan_device
from pipeline.model.transformers_engine import InternVLEngine
from pipeline.stages.generate import Generate
from pipeline.stages.preprocess import Preprocess
from tests.conftest import pattern_image
from tests.helpers import numpy_batch, preprocessed, vision_calls

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
    batched = engine.generate([r[0] for r in requests], [r[1] for r in requests], max_new_tokens=MAX_NEW_TOKENS)
    for (ids, pixels), got in zip(requests, batched):
        ref_ids, ref_tokens, ref_logprobs = reference_generate(tiny_model, prompt, pixels)
        assert ids == ref_ids
        assert got.token_ids == ref_tokens
        np.testing.assert_allclose(got.logprobs, ref_logprobs, atol=1e-4)
    # generated text differs between images: the output depends on the pixels
    assert len({tuple(g.token_ids) for g in batched}) == len(batched)


def test_cpu_runs_equal_length_groups_through_the_language_model_and_padded_batches_agree(engine, samples, monkeypatch):
    prompt = "Describe the image in detail."
    pixels = [*samples, samples[0]]  # two prompts of the same length, others of other lengths
    prompts = [engine.prompt_ids(prompt, [len(p)]) for p in pixels]
    groups = engine.language_groups(prompts)
    assert sorted(map(sorted, groups)) == sorted(equal_length_groups([len(p) for p in prompts]))
    assert [0, len(pixels) - 1] in groups and len(groups) == len(samples)
    prefills = []
    hook = engine.model.model.language_model.register_forward_hook(
        lambda module, args, kwargs, out: prefills.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    try:
        grouped = engine.generate(prompts, pixels, max_new_tokens=MAX_NEW_TOKENS)
    finally:
        hook.remove()
    prefills = [shape for shape in prefills if shape[1] > 1]  # decode steps feed one token each
    assert sorted(prefills) == sorted((len(g), len(prompts[g[0]])) for g in groups)  # no call carries padding
    monkeypatch.setattr(engine, "language_groups", lambda p: [list(range(len(p)))])  # the GPU way: one padded batch
    padded = engine.generate(prompts, pixels, max_new_tokens=MAX_NEW_TOKENS)
    assert [g.token_ids for g in padded] == [g.token_ids for g in grouped]
    for a, b in zip(padded, grouped):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_generate_stage_rows(engine, tmp_path):
    job = parse_job({"task": "vqa", "input": "x", "output": "y", "model": "m", "generation": {"max_new_tokens": 5}})
    batch = preprocessed(job, tmp_path, {"a.png": pattern_image(448, 448), "b.png": pattern_image(448, 448), "c.png": None},
                         {"question": np.array(["What?", None, "Why?"], dtype=object)})
    rows = Generate(job, engine=engine)(batch).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "error"]
    assert [r["error_type"] for r in rows] == [None, "bad_input", "not_found"]
    assert rows[0]["response"] and rows[0]["num_generated_tokens"] == 5 and rows[0]["prompt"] == "What?"
    assert rows[0]["num_input_tokens"] == len(engine.prompt_ids("What?", [1]))
    assert rows[0]["media_type"] == "image" and rows[0]["tiles_per_image"] == [1]
    assert "pixels" not in rows[0]


def test_sampled_rows_depend_only_on_seed_and_row_id(engine, tmp_path, monkeypatch):
    """Each output row samples with its own generator, seeded from (generation.seed, row id): a row's answer is the
    same alone and in batches of other rows, in any order; another job seed gives other answers."""
    job = parse_job({"task": "caption", "input": "x", "output": "y", "model": "m",
                     "generation": {"max_new_tokens": 8, "do_sample": True, "top_p": 0.95, "seed": 5}})
    full = preprocessed(job, tmp_path, {f"{n}.png": pattern_image(w, h) for w, h, n in SIZES})

    def answers(job, keep):
        batch = {name: values[keep] for name, values in full.items()}
        return {r["id"]: r["response"] for r in Generate(job, engine=engine)(batch).to_pylist()}

    together = answers(job, [0, 1, 2])
    assert answers(job, [2]) == {"s2": together["s2"]}
    assert answers(job, [2, 0]) == {"s2": together["s2"], "s0": together["s0"]}
    assert answers(parse_job(job.model_dump(), overrides=["generation.seed=6"]), [0, 1, 2]) != together
    greedy = answers(parse_job(job.model_dump(), overrides=["generation.do_sample=false"]), [0, 1, 2])
    assert greedy != together
    # the row sampler applies transformers' warpers: top_k=1 leaves only the greedy token
    monkeypatch.setattr(engine.model.generation_config, "top_k", 1)
    assert answers(job, [0, 1, 2]) == greedy


def test_min_new_tokens_suppresses_end_tokens(engine, samples, monkeypatch):
    """A fixed answer length (benches): with a generated token made an end token, min_new_tokens carries on."""
    ids = engine.prompt_ids("Describe.", [len(samples[1])])
    free = engine.generate([ids], [samples[1]], max_new_tokens=MAX_NEW_TOKENS)[0]
    stop = free.token_ids[2]
    monkeypatch.setattr(engine, "eos_ids", engine.eos_ids | {stop})
    cut = free.token_ids[: free.token_ids.index(stop) + 1]
    assert engine.generate([ids], [samples[1]], max_new_tokens=MAX_NEW_TOKENS)[0].token_ids == cut
    fixed = engine.generate([ids], [samples[1]], max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS)[0]
    assert len(fixed.token_ids) == MAX_NEW_TOKENS


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
    """An engine stand-in whose device 'runs out of memory' for batches of more than one sample, or for 13 tiles;
    on the host the allocation is real: a tensor no machine can hold, refused by the CPU allocator."""

    def __init__(self, real, where="device"):
        self.real = real
        self.calls = []
        self.where = where

    def prompt_ids(self, text, tiles, **kw):
        return self.real.prompt_ids(text, tiles, **kw)

    def generate(self, prompts, samples, owners, **kw):
        self.calls.append(len(samples))
        if len(samples) > 1 or len(samples[0]) == 13:
            if self.where == "host":
                torch.empty(2**60, dtype=torch.uint8)  # raises: DefaultCPUAllocator: can't allocate memory
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.real.generate(prompts, samples, owners, **kw)


@pytest.mark.parametrize("where", ["device", "host"])
def test_out_of_memory_falls_back_to_single_samples(engine, tmp_path, where):
    job = parse_job({"task": "caption", "input": "x", "output": "y", "model": "m", "generation": {"max_new_tokens": 3}})
    batch = preprocessed(job, tmp_path, {f"{n}.png": pattern_image(w, h) for w, h, n in SIZES})
    fake = _OomOnBatches(engine, where)
    rows = Generate(job, engine=fake)(batch).to_pylist()
    assert fake.calls == [3, 1, 1, 1]  # one at a time at once (no bisection: memory is not a poison sample)
    assert [r["status"] for r in rows] == ["ok", "ok", "error"]
    assert rows[2]["error_type"] == "model_error" and f"out of {where} memory" in rows[2]["error_message"]


def reference_generate_text(model_dir, user_text: str, pixels: np.ndarray, tiles_per_image: list[int], labels: str):
    """One sample with plain transformers, the prompt laid out by hand as the cards do it:
    labels 'Frame' -> `Frame1: <image>\\nFrame2: <image>\\n{q}`, 'Image' -> `Image-1: <image>\\n...{q}`."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = InternVLForConditionalGeneration.from_pretrained(model_dir).eval()
    block = lambda t: "<img>" + "<IMG_CONTEXT>" * (256 * t) + "</img>"  # noqa: E731
    name = (lambda i: f"Frame{i + 1}") if labels == "Frame" else (lambda i: f"Image-{i + 1}")  # noqa: E731
    media = "\n".join(f"{name(i)}: {block(t)}" for i, t in enumerate(tiles_per_image))
    text = (f"<|im_start|>system\nYou are InternVL, a tiny test model.<|im_end|>\n<|im_start|>user\n{media}\n"
            f"{user_text}<|im_end|>\n<|im_start|>assistant\n")
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, pixel_values=torch.from_numpy(normalize_tiles(pixels)), max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    return tokens, [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.logits, tokens)]


def test_video_multi_image_and_questions_batched_equal_single(engine, tiny_model, tmp_path):
    """One batch holding a video (3 questions), a two-image sample and a single image: every output row equals
    one-sample-at-a-time generate with the cards' prompt layout, and the vision tower runs once per sample."""
    from tests.media import make_video

    (tmp_path / "clip.mp4").write_bytes(make_video(30, 10, width=320, height=240))
    pattern_image(1344, 896).save(tmp_path / "wide.png")
    pattern_image(448, 448).save(tmp_path / "square.png")
    questions = ["What happens?", "Is it dark?", "Count the bars."]
    job = parse_job({"task": "vqa", "input": "x", "output": "y", "model": "m", "generation": {"max_new_tokens": MAX_NEW_TOKENS},
                     "video": {"num_frames": 4}, "tiling": {"max_tiles": 12}})
    batch = {
        "id": np.array(["vid", "pair", "one"], dtype=object),
        "uri": np.array([str(tmp_path / "clip.mp4"), str(tmp_path / "wide.png"), str(tmp_path / "square.png")], dtype=object),
        "uris": np.array([None, [str(tmp_path / "wide.png"), str(tmp_path / "square.png")], None], dtype=object),
        "questions": np.array([questions, None, ["Describe."]], dtype=object),
        "question": np.array([None, "Which is bigger?", None], dtype=object),
    }
    prepared = numpy_batch(Preprocess(job)(batch))
    with vision_calls(engine) as calls:
        rows = Generate(job, engine=engine)(prepared).to_pylist()
    assert [(r["id"], r["sample_id"], r["question_index"]) for r in rows] == [
        ("vid#0", "vid", 0), ("vid#1", "vid", 1), ("vid#2", "vid", 2), ("pair", "pair", 0), ("one", "one", 0)]
    video, pair = rows[0], rows[3]
    assert video["media_type"] == "video" and video["tiles_per_image"] == [1, 1, 1, 1] and video["num_frames"] == 30
    assert pair["media_type"] == "images" and pair["tiles_per_image"] == [7, 1]  # budget 12 // 2 = 6: 3x2 grid + thumb
    assert calls == [4 + 8 + 1]  # one vision pass over the batch's 13 tiles: 3 questions share the video's features

    pixels = {r["sample_id"]: p for r, p in zip(_rows_by_sample(prepared), _pixels(prepared))}
    for row in rows:
        labels = "Frame" if row["media_type"] == "video" else "Image"
        tiles = row["tiles_per_image"]
        if row["media_type"] == "image":
            _, ref_tokens, ref_lp = reference_generate(tiny_model, row["prompt"], pixels[row["sample_id"]])
        else:
            ref_tokens, ref_lp = reference_generate_text(tiny_model, row["prompt"], pixels[row["sample_id"]], tiles, labels)
        single = engine.generate([engine.prompt_ids(row["prompt"], tiles, video=labels == "Frame")],
                                 [pixels[row["sample_id"]]], max_new_tokens=MAX_NEW_TOKENS)[0]
        assert single.token_ids == ref_tokens, row["id"]
        assert engine.tokenizer.decode(ref_tokens, skip_special_tokens=True).strip() == row["response"], row["id"]
        np.testing.assert_allclose(single.logprobs, ref_lp, atol=1e-4)
        assert abs(row["mean_logprob"] - float(np.mean(ref_lp))) < 1e-4 and row["num_generated_tokens"] == len(ref_tokens)


def _rows_by_sample(batch):
    return [{"sample_id": i} for i in batch["id"]]


def _pixels(batch):
    from pipeline.media.decode import tiles_from_bytes

    return [tiles_from_bytes(p, int(n)) for p, n in zip(batch["pixels"], batch["num_tiles"])]
