"""`plan` on a cluster of GPUs prints the GPU memory split a vLLM replica will use, and refuses a model that cannot
fit, naming the numbers. A local Ray with four logical GPUs of Ray's accelerator type H100 (plan loads no model, so no
GPU is touched), in a process of its own; its driver is told vLLM is importable (this venv has none; where it is
installed, `compute.engine: auto` picks it on GPUs). The checkpoints are folders holding only the catalogue's
config.json: plan reads a checkpoint's config, never its weights."""

from __future__ import annotations

import json
import subprocess
import sys

from pipeline.model.catalog import find_model
from tests.conftest import REPO, pattern_image

SCRIPT = """
import json, sys
import ray

ray.init(num_cpus=2, num_gpus=4, resources={"accelerator_type:H100": 4}, include_dashboard=False,
         logging_level="ERROR")
from pipeline.config import parse_job
from pipeline.errors import JobError
from pipeline.run import execute
from pipeline.run.runner import plan_job

execute.vllm_installed = lambda: True
for spec in json.loads(sys.argv[1]):
    lines = []
    try:
        plan = plan_job(parse_job(spec), echo=lines.append)
        print(json.dumps({"lines": lines, "memory": plan.estimate["gpu_memory"]}))
    except JobError as err:
        print(json.dumps({"lines": lines, "error": str(err)}))
"""


def test_plan_prints_the_split_and_refuses_what_cannot_fit(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for k in range(2):
        pattern_image(448, 448).save(images / f"{k}.png")
    specs = []
    for name, tp in [("InternVL3-8B", 1), ("InternVL3-78B", 1), ("InternVL3-78B", 4)]:
        model = tmp_path / f"{name}-hf"
        model.mkdir(exist_ok=True)
        (model / "config.json").write_text(json.dumps(find_model(name).config()))
        specs.append({"task": "caption", "input": str(images), "output": str(tmp_path / f"out-{name}-{tp}"),
                      "model": str(model), "compute": {"tp": tp}})
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(specs)], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    small, large, sharded = (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))
    printed = "\n".join(small["lines"])
    assert "GPU memory of a vLLM replica (H100): 79.6 GiB a GPU: vision tower 0.6 GiB" in printed
    assert "vLLM gpu_memory_utilization 0.92" in printed and small["memory"]["fits"]
    assert small["memory"]["tiles_in_flight"] == 416 and small["memory"]["vllm_fraction"] == 0.92
    assert "does not fit a 79.6 GiB GPU at compute.tp=1" in large["error"]
    assert "the language model (135.4 GiB a rank)" in large["error"] and "use a larger compute.tp" in large["error"].lower()
    assert sharded["memory"]["fits"] and sharded["memory"]["tp"] == 4 and sharded["memory"]["vllm_fraction"] == 0.78
