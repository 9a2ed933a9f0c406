"""Written estimate: InternVL3-1B on one H100 — FLOPs per image, the images/s limit, CPU workers per GPU.

Not a measurement (there is no GPU here): FLOPs are counted from the published architecture (InternViT-300M-448px-V2_5:
24 layers, width 1024, MLP 4096, 1025 tokens a tile; Qwen2.5-0.5B: 24 layers, width 896, MLP 4864, 14 query and
2 key/value heads of 64; pixel shuffle to 256 tokens a tile), 2 FLOPs per multiply-add, attention included.
The GPU side assumes 989 dense bf16 TFLOP/s (H100 SXM) at a model FLOPs utilisation you choose (default 40%).
The CPU side takes per-core rates of our exact CPU stage (images/s of CPU time, one thread): the defaults were
measured on the 2-core development machine with --measure (512x512 -> 1 tile, 1920x1280 -> 7, 4032x3024 -> 13,
photo-like JPEGs at quality 90).

    PYTHONPATH=. python bench/h100_estimate.py [--mfu 0.4] [--prompt-tokens 30] [--per-core 1:112 7:10.8 13:2.5] [--measure]
"""

from __future__ import annotations

import argparse

H100_BF16_TFLOPS = 989.0


def vit_flops(tokens: int = 1025, layers: int = 24, width: int = 1024, mlp: int = 4096) -> float:
    """One 448 px tile through InternViT-300M: QKV + output projections, MLP, attention scores and mixing."""
    linear = layers * tokens * 2 * (4 * width * width + 2 * width * mlp)
    attention = layers * 2 * 2 * tokens * tokens * width
    return float(linear + attention)


def projector_flops(tokens: int = 256, vit_width: int = 1024, lm_width: int = 896) -> float:
    """Pixel-shuffled features (4 x 1024 wide) through the two-layer MLP into the language model's width."""
    return float(tokens * 2 * (4 * vit_width * lm_width + lm_width * lm_width))


def lm_prefill_flops(tokens: int, layers: int = 24, width: int = 896, mlp: int = 4864, heads: int = 14,
                     kv_heads: int = 2, head_dim: int = 64) -> float:
    """Prompt tokens through Qwen2.5-0.5B (logits only for the last position, as generate computes them)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    per_token = 2 * (width * q + 2 * width * kv + q * width + 3 * width * mlp)
    attention = 2 * 2 * tokens * tokens * q / 2  # causal: half the score matrix on average
    return float(layers * (tokens * per_token + attention))


def image_flops(tiles: int, prompt_tokens: int) -> float:
    return tiles * (vit_flops() + projector_flops()) + lm_prefill_flops(tiles * 256 + prompt_tokens)


def measure_per_core(seconds: float = 3.0) -> dict[int, float]:
    """Images/s of CPU time of Preprocess.prepare on one thread, per tile count."""
    import time

    import torch

    from bench.media import camera_jpeg
    from pipeline.config import parse_job
    from pipeline.stages.preprocess import Preprocess

    torch.set_num_threads(1)
    stage = Preprocess(parse_job({"task": "caption", "input": "x", "output": "y", "model": "m"}))
    rates = {}
    for w, h in [(512, 512), (1920, 1280), (4032, 3024)]:
        path = str(camera_jpeg("natural", w, h, 1))
        tiles = stage.prepare(path)["num_tiles"]
        start, n = time.process_time(), 0
        while time.process_time() - start < seconds:
            stage.prepare(path)
            n += 1
        rates[tiles] = n / (time.process_time() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed on the GPU")
    parser.add_argument("--prompt-tokens", type=int, default=30, help="chat template + instruction tokens")
    parser.add_argument("--per-core", nargs="*", default=["1:112", "7:10.8", "13:2.5"],
                        help="tiles:images-per-second-per-core pairs measured by bench/cpu_stage.py")
    parser.add_argument("--measure", action="store_true", help="measure the per-core rates on this machine instead")
    args = parser.parse_args()
    per_core = dict((int(t), float(r)) for t, r in (p.split(":") for p in args.per_core))
    if args.measure:
        per_core = measure_per_core()
    effective = H100_BF16_TFLOPS * args.mfu
    print(f"H100 SXM, {H100_BF16_TFLOPS:.0f} TFLOP/s bf16 dense x {args.mfu:.0%} MFU = {effective:.0f} TFLOP/s")
    print(f"one tile: vision {vit_flops() / 1e9:.0f} GFLOP + projector {projector_flops() / 1e9:.1f} GFLOP "
          f"+ 256 LM tokens {lm_prefill_flops(256) / 1e9:.0f} GFLOP")
    print(f"{'tiles':>5} {'TFLOP/image':>12} {'images/s limit':>15} {'CPU img/s/core':>15} {'CPU workers/GPU':>16}")
    for tiles in sorted({1, 7, 13, *per_core}):
        flops = image_flops(tiles, args.prompt_tokens)
        limit = effective * 1e12 / flops
        cpu = per_core.get(tiles)
        workers = f"{limit / cpu:16.1f}" if cpu else f"{'-':>16}"
        print(f"{tiles:>5} {flops / 1e12:12.2f} {limit:15.0f} {cpu or 0:15.1f} {workers}")
    print("Prefill and vision only: generating the answer adds one decode step per token, which for a 0.5B model is "
          "memory- and launch-bound (large batches amortise it); the images/s limits are upper bounds.")


if __name__ == "__main__":
    main()
