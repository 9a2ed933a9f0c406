"""Bench: InternVLEngine (transformers) vs VLLMEngine (our vision tower + vLLM) on InternVL3-1B's architecture.

Builds a randomly initialised checkpoint with the published InternVL3-1B(-hf) architecture (InternViT-300M-448px,
pixel shuffle to 256 tokens a tile, 2-layer MLP projector, Qwen2.5-0.5B), written out below; no download. The
tokenizer is the tiny test model's (the model's vocabulary keeps its real 151,674 rows; ids past the tokenizer's
are simply never in a prompt). Answers have a fixed length (min_new_tokens = max_new_tokens on both engines: end
tokens suppressed), so both generate the same number of tokens whatever the random weights say. For each tile
count: images/s and output tokens/s of each engine, their ratio, and the fraction of the FLOP limit (vision,
prefill and decode FLOPs counted as bench/h100_estimate.py counts them, over --peak-tflops: H100/H200 dense bf16
by default).

The transformers engine runs batches of --batch images one after another (one padded batch each, as on GPU); the
vLLM engine gets the same batches all in flight at once (generate_async: a Ray Data actor with max_concurrency).

GPU (one device, well under 10 minutes; `pip install -e '.[vllm]'` beside a CUDA torch, which registers the
engine's vLLM plugin):
    PYTHONPATH=. python bench/gpu_engines.py
CPU (the tiny checkpoint, to show it runs; the vLLM lane's venv, .ci/vllm-lane):
    PYTHONPATH=. .venv-vllm/bin/python bench/gpu_engines.py --tiny
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

# Qwen2.5-0.5B as InternVL3-1B's language model; the original checkpoint's rope_scaling (dynamic NTK, factor 2)
# changes nothing below 32,768 positions and is left out, so both engines use plain RoPE at these lengths.
INTERNVL3_1B_TEXT = {
    "model_type": "qwen2",
    "vocab_size": 151674,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}
# InternViT-300M-448px-V2_5.
INTERNVL3_1B_VISION = {
    "model_type": "internvl_vision",
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "hidden_act": "gelu",
    "image_size": [448, 448],
    "patch_size": [14, 14],
    "num_channels": 3,
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6,
    "attention_bias": True,
    "use_qk_norm": False,
    "use_absolute_position_embeddings": True,
    "use_mean_pooling": True,
    "use_mask_token": False,
    "layer_scale_init_value": 0.1,
    "attention_dropout": 0.0,
    "projection_dropout": 0.0,
    "hidden_dropout_prob": 0.0,
    "initializer_range": 0.02,
}
INTERNVL3_1B = {
    "architectures": ["InternVLForConditionalGeneration"],
    "downsample_ratio": 0.5,
    "image_seq_length": 256,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
    "tie_word_embeddings": False,
    "vision_config": INTERNVL3_1B_VISION,
    "text_config": INTERNVL3_1B_TEXT,
}
# image (width, height) -> tiles with the cards' tiling (max 12 tiles + thumbnail)
IMAGE_SIZES = {1: (448, 448), 7: (1344, 896), 13: (1792, 1344)}
PROMPT = "Describe the image in detail."


def build_internvl3_1b(out_dir: Path, device: str) -> Path:
    """Write a randomly initialised InternVL3-1B-architecture checkpoint (bf16) with the tiny tokenizer."""
    import torch
    from transformers import GenerationConfig, InternVLConfig, InternVLForConditionalGeneration

    from pipeline.embedded.tiny_model import build_tokenizer
    from pipeline.model.processor_files import write_processor

    tokenizer = build_tokenizer()
    text = dict(INTERNVL3_1B_TEXT, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    config = InternVLConfig(**dict(INTERNVL3_1B, text_config=text, image_token_id=tokenizer.context_image_token_id))
    torch.manual_seed(0)
    with torch.device(device):
        model = InternVLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_processor(out_dir, image_seq_length=INTERNVL3_1B["image_seq_length"])
    del model
    return out_dir


def flops_per_image(config: dict, tiles: int, prompt_tokens: int, new_tokens: int) -> float:
    """Vision + projector per tile, prefill of the prompt and decode of the answer (= a prefill of prompt + answer
    under h100_estimate's causal count), and the lm_head for each answer token."""
    from bench.h100_estimate import lm_prefill_flops, projector_flops, vit_flops

    v, t = config["vision_config"], config["text_config"]
    patches = (v["image_size"][0] // v["patch_size"][0]) ** 2
    image_tokens = int(patches * config["downsample_ratio"] ** 2)
    head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
    vision = vit_flops(patches + 1, v["num_hidden_layers"], v["hidden_size"], v["intermediate_size"])
    vision += projector_flops(image_tokens, v["hidden_size"], t["hidden_size"])
    language = lm_prefill_flops(prompt_tokens + new_tokens, t["num_hidden_layers"], t["hidden_size"],
                                t["intermediate_size"], t["num_attention_heads"], t["num_key_value_heads"], head_dim)
    return tiles * vision + language + new_tokens * 2 * t["hidden_size"] * t["vocab_size"]


def workload(engine, tiles: int, images: int):
    """`images` copies of one image of `tiles` tiles, one prompt each."""
    from pipeline.media.tiling import tile_image
    from tests.conftest import pattern_image

    pixels = tile_image(pattern_image(*IMAGE_SIZES[tiles])).pixels
    assert len(pixels) == tiles
    ids = engine.prompt_ids(PROMPT, [tiles])
    return [ids] * images, [pixels] * images


def batches(prompts, samples, size: int):
    return [(prompts[k:k + size], samples[k:k + size]) for k in range(0, len(prompts), size)]


def bench_transformers(path: Path, runs: dict, args) -> dict:
    import torch

    from pipeline.model.engine import InternVLEngine

    start = time.perf_counter()
    engine = InternVLEngine.load(str(path))
    fixed = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)  # end tokens suppressed
    startup = time.perf_counter() - start
    out = {}
    for tiles, images in runs.items():
        prompts, samples = workload(engine, tiles, images)
        engine.generate(prompts[:1], samples[:1], **fixed)  # warm-up
        sync()
        start = time.perf_counter()
        calls = batches(prompts, samples, args.batch)
        results = [engine.generate(p, s, **fixed) for p, s in calls]
        sync()
        out[tiles] = dict(seconds=time.perf_counter() - start, images=images, prompt=len(prompts[0]),
                          tokens=sum(len(g.token_ids) for batch in results for g in batch),
                          answer=results[0][0].token_ids)
    out["startup_s"] = startup
    if torch.cuda.is_available():
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def bench_vllm(path: Path, runs: dict, args) -> dict:
    from pipeline.model.vllm_engine import VLLMEngine

    options = dict(enforce_eager=args.enforce_eager, max_model_len=args.max_model_len)
    if args.tiny:
        options["kv_cache_memory_bytes"] = 256 << 20
    else:
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    start = time.perf_counter()
    engine = VLLMEngine.load(str(path), options=options)
    startup = time.perf_counter() - start
    out = {}
    try:
        for tiles, images in runs.items():
            prompts, samples = workload(engine, tiles, images)
            engine.generate(prompts[:1], samples[:1], max_new_tokens=2, min_new_tokens=2)  # warm-up

            start = time.perf_counter()
            results = asyncio.run(all_in_flight(engine, batches(prompts, samples, args.batch), args.new_tokens))
            out[tiles] = dict(seconds=time.perf_counter() - start, images=images, prompt=len(prompts[0]),
                              tokens=sum(len(g.token_ids) for batch in results for g in batch),
                              answer=results[0][0].token_ids)
    finally:
        engine.close()
    out["startup_s"] = startup
    return out


async def all_in_flight(engine, calls: list, new_tokens: int) -> list:
    """Every batch's generate_async at once, as an actor with max_concurrency >= len(calls) would run them."""
    fixed = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return await asyncio.gather(*(engine.generate_async(p, s, **fixed) for p, s in calls))


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def report(config: dict, hf: dict, vl: dict, args) -> None:
    peak = args.peak_tflops * 1e12
    print(f"\nfixed answers of {args.new_tokens} tokens, batches of {args.batch}; FLOP limit {args.peak_tflops:.0f} "
          f"TFLOP/s{' (an H100/H200 figure: on CPU the fraction only shows the bench runs)' if args.tiny else ''}")
    print(f"startup: transformers {hf['startup_s']:.1f} s, vLLM {vl['startup_s']:.1f} s")
    head = (f"{'tiles':>5} {'images':>6} | {'HF img/s':>9} {'HF tok/s':>9} {'HF FLOP%':>8} | {'vLLM img/s':>10} "
            f"{'vLLM tok/s':>10} {'vLLM FLOP%':>10} | {'vLLM/HF':>7} {'same greedy tokens':>18}")
    print(head)
    print("-" * len(head))
    rows = []
    for tiles in hf:
        if not isinstance(tiles, int):
            continue
        a, b = hf[tiles], vl[tiles]
        flops = flops_per_image(config, tiles, a["prompt"], args.new_tokens)
        row = dict(tiles=tiles, images=a["images"], hf_images_s=a["images"] / a["seconds"],
                   hf_tokens_s=a["tokens"] / a["seconds"], vllm_images_s=b["images"] / b["seconds"],
                   vllm_tokens_s=b["tokens"] / b["seconds"], tflop_per_image=flops / 1e12)
        row["hf_flop_fraction"] = row["hf_images_s"] * flops / peak
        row["vllm_flop_fraction"] = row["vllm_images_s"] * flops / peak
        row["ratio"] = row["vllm_images_s"] / row["hf_images_s"]
        same = next((k for k, (x, y) in enumerate(zip(a["answer"], b["answer"])) if x != y), len(a["answer"]))
        row["same_greedy_prefix"] = same  # of the first image's answer; random weights: near-ties can flip in bf16
        rows.append(row)
        print(f"{tiles:>5} {a['images']:>6} | {row['hf_images_s']:>9.2f} {row['hf_tokens_s']:>9.1f} "
              f"{row['hf_flop_fraction']:>8.2%} | {row['vllm_images_s']:>10.2f} {row['vllm_tokens_s']:>10.1f} "
              f"{row['vllm_flop_fraction']:>10.2%} | {row['ratio']:>6.2f}x {same:>8}/{len(a['answer'])} first")
    print(json.dumps({"rows": rows, "transformers": hf, "vllm": vl}, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test checkpoint on CPU (shows the bench runs)")
    parser.add_argument("--tiles", type=int, nargs="*", default=[1, 7, 13], choices=sorted(IMAGE_SIZES))
    parser.add_argument("--images", type=int, nargs="*", default=None,
                        help="images per tile count (default GPU 256 128 64, CPU 4 4 2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="fixed answer length (default GPU 64, CPU 8)")
    parser.add_argument("--batch", type=int, default=None, help="images per engine call (default GPU 32, CPU 2)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="FLOP limit (default 989, dense bf16)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile / CUDA graphs")
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse (or write) the checkpoint here")
    args = parser.parse_args()
    args.images = args.images or ([4, 4, 2] if args.tiny else [256, 128, 64])[: len(args.tiles)]
    args.new_tokens = args.new_tokens or (8 if args.tiny else 64)
    args.batch = args.batch or (2 if args.tiny else 32)
    if args.peak_tflops is None:
        from bench.h100_estimate import H100_BF16_TFLOPS

        args.peak_tflops = H100_BF16_TFLOPS
    if args.tiny:
        args.enforce_eager = True
    if args.tiny:  # the vLLM lane's CPU torchvision shim, here and (PYTHONPATH) in vLLM's processes
        from tests.vllm import lane

        lane.setup()
    import torch

    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("no CUDA device: run with --tiny on CPU")
    runs = dict(zip(args.tiles, args.images))
    with tempfile.TemporaryDirectory(prefix="internvl-bench-") as tmp:
        path = args.checkpoint or Path(tmp) / "model"
        start = time.perf_counter()
        if not (path / "config.json").exists():
            if args.tiny:
                from pipeline.embedded.tiny_model import make_tiny_model

                make_tiny_model(path)
            else:
                build_internvl3_1b(path, "cuda")
        print(f"checkpoint {path} ready in {time.perf_counter() - start:.1f} s")
        config = json.loads((path / "config.json").read_text())
        hf = bench_transformers(path, runs, args)
        vl = bench_vllm(path, runs, args)
    report(config, hf, vl, args)


if __name__ == "__main__":
    main()
