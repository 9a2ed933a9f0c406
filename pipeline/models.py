"""The InternVL checkpoints this pipeline serves (from the model cards' tables), with a sizing hint each.

Parameter counts are approximate (the cards' model sizes); weights are counted in bf16 (2 bytes a parameter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

VIT_300M, VIT_6B = "InternViT-300M-448px", "InternViT-6B-448px"


@dataclass(frozen=True)
class ModelInfo:
    """One published checkpoint: what it is made of and how big it is."""

    name: str
    vision: str
    language_model: str
    params_b: float
    native_hf: bool = False  # a `*-hf` native transformers repository exists
    default_max_tiles: int = 12

    @property
    def weights_gb(self) -> float:
        return self.params_b * 2

    def gpus_needed(self, gpu_gb: float, *, headroom: float = 1.25) -> int:
        """Smallest power-of-two tensor-parallel degree whose GPUs hold the bf16 weights plus headroom for the
        KV cache and activations (a rule of thumb, not a measurement)."""
        need = math.ceil(self.weights_gb * headroom / gpu_gb)
        return 1 << max(0, math.ceil(math.log2(max(need, 1))))


MODELS = [
    ModelInfo("InternVL3-1B", VIT_300M + "-V2_5", "Qwen2.5-0.5B", 0.9, native_hf=True),
    ModelInfo("InternVL3-2B", VIT_300M + "-V2_5", "Qwen2.5-1.5B", 2.1, native_hf=True),
    ModelInfo("InternVL3-8B", VIT_300M + "-V2_5", "Qwen2.5-7B", 7.9, native_hf=True),
    ModelInfo("InternVL3-9B", VIT_300M + "-V2_5", "internlm3-8b-instruct", 9.1, native_hf=True),
    ModelInfo("InternVL3-14B", VIT_300M + "-V2_5", "Qwen2.5-14B", 15.1, native_hf=True),
    ModelInfo("InternVL3-38B", VIT_6B + "-V2_5", "Qwen2.5-32B", 38.4, native_hf=True),
    ModelInfo("InternVL3-78B", VIT_6B + "-V2_5", "Qwen2.5-72B", 78.4, native_hf=True),
    ModelInfo("InternVL2_5-1B", VIT_300M + "-V2_5", "Qwen2.5-0.5B-Instruct", 0.9),
    ModelInfo("InternVL2_5-2B", VIT_300M + "-V2_5", "internlm2_5-1_8b-chat", 2.2),
    ModelInfo("InternVL2_5-4B", VIT_300M + "-V2_5", "Qwen2.5-3B-Instruct", 3.7),
    ModelInfo("InternVL2_5-8B", VIT_300M + "-V2_5", "internlm2_5-7b-chat", 8.1),
    ModelInfo("InternVL2_5-26B", VIT_6B + "-V2_5", "internlm2_5-20b-chat", 25.5),
    ModelInfo("InternVL2_5-38B", VIT_6B + "-V2_5", "Qwen2.5-32B-Instruct", 38.4),
    ModelInfo("InternVL2_5-78B", VIT_6B + "-V2_5", "Qwen2.5-72B-Instruct", 78.4),
    ModelInfo("Mini-InternVL-Chat-4B-V1-5", VIT_300M, "Phi-3-mini-128k-instruct", 4.2),
]
