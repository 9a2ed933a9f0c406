"""Bench: the model stage on one GPU with each engine, side by side: `transformers` (InternVLEngine), `vllm` (ours:
our tiles and vision tower, vLLM for the language model) and `vllm-native` (vLLM's own InternVL path: its processor
tiles the pictures, its own vision tower, as Ray Data LLM runs it), on InternVL3-1B's architecture.

The checkpoint is randomly initialised with the published InternVL3-1B(-hf) architecture (InternViT-300M-448px,
pixel shuffle to 256 tokens a tile, 2-layer MLP projector, Qwen2.5-0.5B), written out below; no download. The
tokenizer is the tiny test model's (the model's vocabulary keeps its real 151,674 rows; ids past the tokenizer's are
never in a prompt, and decode to nothing). Random weights almost never pick the end token (one of 151,674), so
answers run to --new-tokens on every engine.

What is timed: the job's model stage (pipeline/stages: `Generate`, or `AsyncGenerate` for an engine with
`generate_async`) over rows the CPU stage made beforehand (`Preprocess`, untimed: on a cluster scaled-out CPU
workers make them; vllm-native's own tiling runs inside vLLM, so inside the timing, as on a cluster). The sync stage
(transformers) takes the batches one after another, the async ones take them all in flight at once (a Ray Data
actor with max_concurrency). Workloads: captions of 1-, 7- and 13-tile images and a VQA of 7-tile images asked
3 questions each. Per workload and engine: images/s, rows/s, output tokens/s, the fraction of the FLOP limit
(FLOPs counted as bench/h100_estimate.py counts them, over --peak-tflops) and the first answer; then the ratios
and issue #25's targets (printed, never asserted): ours on vLLM >= 3x transformers on 1-tile captions, >= 1.0x
vllm-native, >= 50% of the FLOP limit on 13-tile images. The vLLM replica takes its GPU share from
model/gpu_memory.py, as a job does.

GPU (one device; `pip install -e '.[vllm]'` beside a CUDA torch, which registers our vLLM plugin):
    PYTHONPATH=. python bench/gpu_engines.py [--engines transformers vllm vllm-native] [--out results.json]
CPU (the tiny checkpoint, to show it runs; the vLLM lane's venv also runs the vLLM engines):
    PYTHONPATH=. .venv-vllm/bin/python bench/gpu_engines.py --tiny
bench/device_check.py runs it one engine per process (--engines X --checkpoint DIR --out part.json).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import json
import sys
import tempfile
import time
import typing
from pathlib import Path

from bench.internvl3_1b import build_internvl3_1b

ENGINES = ("transformers", "vllm", "vllm-native")
# image (width, height) -> tiles with the cards' tiling (max 12 tiles + thumbnail)
IMAGE_SIZES = {1: (448, 448), 7: (1344, 896), 13: (1792, 1344)}
QUESTIONS = ["Describe the image in detail.", "What colours are in it?", "What is in the top left corner?"]
VQA_TILES = 7


def picture(width: int, height: int):
    """A deterministic test picture (the spec's pattern: R=(7x+3y)%256, G=(x*y)%256, B=(x^y)%256)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    rgb = np.stack([(7 * x + 3 * y) % 256, (x * y) % 256, (x ^ y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def flops_per_image(config: dict, tiles: int, prompt_tokens: int, new_tokens: float) -> float:
    """Vision + projector per tile, prefill of the prompt and decode of the answer (= a prefill of prompt + answer
    under h100_estimate's causal count), and the lm_head for each answer token."""
    from bench.h100_estimate import lm_prefill_flops, projector_flops, vit_flops

    v, t = config["vision_config"], config["text_config"]
    patches = (v["image_size"][0] // v["patch_size"][0]) ** 2
    image_tokens = int(patches * config["downsample_ratio"] ** 2)
    head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
    vision = vit_flops(patches + 1, v["num_hidden_layers"], v["hidden_size"], v["intermediate_size"])
    vision += projector_flops(image_tokens, v["hidden_size"], t["hidden_size"])
    language = lm_prefill_flops(int(prompt_tokens + new_tokens), t["num_hidden_layers"], t["hidden_size"],
                                t["intermediate_size"], t["num_attention_heads"], t["num_key_value_heads"], head_dim)
    return tiles * vision + language + new_tokens * 2 * t["hidden_size"] * t["vocab_size"]


def workloads(args) -> list[dict]:
    """The captions of each tile count, then the VQA."""
    out = [dict(name=f"caption {t} tiles", tiles=t, images=n, questions=None) for t, n in zip(args.tiles, args.images)]
    if args.vqa:
        out.append(dict(name=f"vqa {VQA_TILES} tiles x {len(QUESTIONS)}", tiles=VQA_TILES, images=args.vqa,
                        questions=QUESTIONS))
    return out


def job_for(kind: str, path: Path, args, questions=None):
    """The job a replica of this engine would run (its model stage's settings)."""
    from pipeline.config import parse_job

    vllm = {"max_model_len": args.max_model_len, "enforce_eager": args.enforce_eager}
    if args.tiny:
        vllm["kv_cache_memory_bytes"] = 256 << 20
    return parse_job({"task": "vqa" if questions else "caption", "input": "in", "output": "out", "model": str(path),
                      "questions": questions, "generation": {"max_new_tokens": args.new_tokens},
                      "compute": {"engine": kind, "device": "cpu" if args.tiny else "cuda", "batch_size": args.batch,
                                  "vllm": vllm}})


def numpy_batch(table) -> dict:
    """An Arrow table as a numpy column batch, as Ray Data hands one to the model stage (without Ray)."""
    import numpy as np

    out = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        column = np.empty(len(values), dtype=object)
        for i, value in enumerate(values):
            column[i] = value
        out[name] = column
    return out


def batches_for(job, folder: Path, tiles: int, images: int, size: int) -> list[dict]:
    """`images` rows of one picture of `tiles` tiles, through the CPU stage once and copied, in batches of `size`."""
    import numpy as np

    from pipeline.stages.preprocess import Preprocess

    uri = folder / f"{tiles}.png"
    if not uri.exists():
        picture(*IMAGE_SIZES[tiles]).save(uri)
    row = numpy_batch(Preprocess(job)({"id": np.array(["x"], dtype=object), "uri": np.array([str(uri)], dtype=object)}))
    if "num_tiles" in row and row["num_tiles"][0] not in (None, tiles):
        raise ValueError(f"{uri} became {row['num_tiles'][0]} tiles, not {tiles}")
    out = []
    for start in range(0, images, size):
        n = min(size, images - start)
        batch = {name: np.repeat(values, n) for name, values in row.items()}
        batch["id"] = np.array([f"{tiles}-{start + k}" for k in range(n)], dtype=object)
        out.append(batch)
    return out


def run_stage(stage, batches: list[dict]) -> list:
    """The stage over the batches: one after another (sync), or all in flight at once (async)."""
    if inspect.iscoroutinefunction(stage.__call__):
        async def all_in_flight():
            return await asyncio.gather(*(stage(b) for b in batches))

        return asyncio.run(all_in_flight())
    return [stage(b) for b in batches]


def unavailable(kind: str) -> str | None:
    """Why an engine cannot run here, or None."""
    import importlib.util

    from pipeline.model.engines import Engine

    if kind not in typing.get_args(Engine):
        return f"compute.engine {kind!r} is not in this checkout (engines: {', '.join(typing.get_args(Engine))})"
    if kind != "transformers" and importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed here (pip install 'internvl-batch[vllm]')"
    return None


def bench_engine(kind: str, path: Path, args) -> dict:
    """One engine over every workload: load once, warm up, time each workload's model stage."""
    import torch

    from pipeline.stages.generate import AsyncGenerate, Generate
    from pipeline.stages.model_stage import load_engine

    reason = unavailable(kind)
    if reason:
        return {"skipped": reason}
    start = time.perf_counter()
    engine = load_engine(job_for(kind, path, args), kind)
    out: dict = {"startup_s": time.perf_counter() - start, "workloads": {}}
    llm = getattr(engine, "llm", None)
    if llm is not None:
        out["gpu_memory_utilization"] = getattr(getattr(llm.vllm_config, "cache_config", None), "gpu_memory_utilization", None)
    stage_class = AsyncGenerate if hasattr(engine, "generate_async") else Generate
    try:
        with tempfile.TemporaryDirectory(prefix="bench-pictures-") as folder:
            for work in workloads(args):
                job = job_for(kind, path, args, work["questions"])
                stage = stage_class(job, engine=engine, kind=kind)
                batches = batches_for(job, Path(folder), work["tiles"], work["images"], args.batch)
                run_stage(stage, [{k: v[:1] for k, v in batches[0].items()}])  # warm-up
                sync()
                start = time.perf_counter()
                tables = run_stage(stage, batches)
                sync()
                seconds = time.perf_counter() - start
                rows = [r for t in tables for r in t.to_pylist()]
                out["workloads"][work["name"]] = dict(
                    seconds=seconds, tiles=work["tiles"], images=work["images"], rows=len(rows),
                    ok=sum(r["status"] == "ok" for r in rows), tokens=sum(r["num_generated_tokens"] or 0 for r in rows),
                    prompt_tokens=rows[0]["num_input_tokens"], answer=rows[0]["response"],
                    error=next((r["error_message"] for r in rows if r["status"] != "ok"), None))
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    if torch.cuda.is_available():
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        free, total = torch.cuda.mem_get_info()
        out["device_used_gib"] = (total - free) / 2**30
    del engine
    gc.collect()
    return out


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summarise(config: dict, engines: dict, args) -> dict:
    """Per workload: each engine's rates and FLOP fraction, the ratios, and the targets."""
    peak = args.peak_tflops * 1e12
    rows = []
    for work in workloads(args):
        row: dict = {"workload": work["name"], "tiles": work["tiles"], "images": work["images"]}
        for kind, result in engines.items():
            got = (result.get("workloads") or {}).get(work["name"])
            if not got:
                continue
            images_s = got["images"] / got["seconds"]
            per_row = got["tokens"] / max(got["rows"], 1)
            vision = work["tiles"] * flops_per_image(config, 1, 0, 0)  # the tower runs once a sample
            language = flops_per_image(config, work["tiles"], got["prompt_tokens"], per_row) - vision
            flops = vision + len(work["questions"] or [None]) * language  # each question's prompt and answer
            row[kind] = dict(images_s=images_s, rows_s=got["rows"] / got["seconds"],
                             tokens_s=got["tokens"] / got["seconds"], flop_fraction=images_s * flops / peak,
                             ok=f"{got['ok']}/{got['rows']}")
        if "vllm" in row and "transformers" in row:
            row["vllm_over_transformers"] = row["vllm"]["images_s"] / row["transformers"]["images_s"]
        if "vllm" in row and "vllm-native" in row:
            row["vllm_over_native"] = row["vllm"]["images_s"] / row["vllm-native"]["images_s"]
        rows.append(row)
    first = next((r for r in rows if r["tiles"] == 1 and "vqa" not in r["workload"]), {})
    last = next((r for r in rows if r["tiles"] == 13), {})
    targets = {"vllm >= 3x transformers, 1-tile captions": first.get("vllm_over_transformers"),
               "vllm >= 1.0x vllm-native, 1-tile captions": first.get("vllm_over_native"),
               "vllm >= 50% of the FLOP limit, 13 tiles": (last.get("vllm") or {}).get("flop_fraction")}
    met = {name: None if value is None else value >= bound
           for (name, value), bound in zip(targets.items(), (3.0, 1.0, 0.5))}
    return {"rows": rows, "targets": targets, "targets_met": met}


def table(summary: dict, engines: dict) -> str:
    """The summary as a printed table."""
    kinds = [k for k in ENGINES if k in engines]
    lines = ["workload              | " + " | ".join(f"{k:>12} img/s  FLOP%" for k in kinds) + " | vLLM/HF | vLLM/native"]
    for row in summary["rows"]:
        cells = [f"{row[k]['images_s']:>18.2f} {row[k]['flop_fraction']:>6.1%}" if k in row else f"{'-':>25}"
                 for k in kinds]
        ratio = [f"{row[r]:.2f}x" if r in row else "-" for r in ("vllm_over_transformers", "vllm_over_native")]
        lines.append(f"{row['workload']:<21} | " + " | ".join(cells) + f" | {ratio[0]:>7} | {ratio[1]:>11}")
    for kind, result in engines.items():
        if "skipped" in result:
            lines.append(f"{kind}: skipped: {result['skipped']}")
        else:
            lines.append(f"{kind}: started in {result['startup_s']:.1f} s"
                         + (f", gpu_memory_utilization {result['gpu_memory_utilization']}"
                            if result.get("gpu_memory_utilization") is not None else ""))
    for name, value in summary["targets"].items():
        shown = "not measured" if value is None else (f"{value:.1%}" if "FLOP" in name else f"{value:.2f}x")
        verdict = {True: "met", False: "NOT met", None: ""}[summary["targets_met"][name]]
        lines.append(f"target {name}: {shown} {verdict}".rstrip())
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test checkpoint on CPU (shows the bench runs)")
    parser.add_argument("--engines", nargs="*", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--tiles", type=int, nargs="*", default=[1, 7, 13], choices=sorted(IMAGE_SIZES))
    parser.add_argument("--images", type=int, nargs="*", default=None,
                        help="caption images per tile count (default GPU 128 32 32, CPU 4 2 2)")
    parser.add_argument("--vqa", type=int, default=None, help="7-tile images asked 3 questions (default GPU 16, CPU 2; 0: none)")
    parser.add_argument("--new-tokens", type=int, default=None, help="answer length (default GPU 128, CPU 8)")
    parser.add_argument("--batch", type=int, default=None, help="images per model batch (default GPU 32, CPU 2)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="FLOP limit (default 989, H100 dense bf16)")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile / CUDA graphs")
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse (or write) the checkpoint here")
    parser.add_argument("--build-only", action="store_true", help="write the checkpoint and stop")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.images = args.images or ([4, 2, 2] if args.tiny else [128, 32, 32])[: len(args.tiles)]
    args.vqa = (2 if args.tiny else 16) if args.vqa is None else args.vqa
    args.new_tokens = args.new_tokens or (8 if args.tiny else 128)
    args.batch = args.batch or (2 if args.tiny else 32)
    if args.peak_tflops is None:
        from bench.h100_estimate import H100_BF16_TFLOPS

        args.peak_tflops = H100_BF16_TFLOPS
    args.enforce_eager = args.enforce_eager or args.tiny
    return args


def ensure_checkpoint(path: Path, tiny: bool) -> float:
    """Write the checkpoint unless it is there; the seconds it took."""
    start = time.perf_counter()
    if not (path / "config.json").exists():
        if tiny:
            from pipeline.embedded.tiny_model import make_tiny_model

            make_tiny_model(path)
        else:
            build_internvl3_1b(path, "cuda")
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.tiny:  # the vLLM lane's CPU torchvision shim, here and (PYTHONPATH) in vLLM's processes
        from tests.vllm import lane

        lane.setup()
    import torch

    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("no CUDA device: run with --tiny on CPU")
    with tempfile.TemporaryDirectory(prefix="internvl-bench-") as tmp:
        path = args.checkpoint or Path(tmp) / "model"
        built = ensure_checkpoint(path, args.tiny)
        print(f"checkpoint {path} ready in {built:.1f} s", flush=True)
        if args.build_only:
            return
        config = json.loads((path / "config.json").read_text())
        engines = {kind: bench_engine(kind, path, args) for kind in args.engines}
    summary = summarise(config, engines, args)
    print(table(summary, engines))
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "config": config,
              "engines": engines, **summary}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
