"""The InternVL checkpoints this pipeline serves (from the model cards' tables), with sizing for each.

Parameter counts are approximate (the cards' model sizes); weights are counted in bf16 (2 bytes a parameter).
With tensor parallelism (compute.tp) the language model is sharded over the tp GPUs of a replica while the
vision tower is replicated on each, so a GPU holds lm/tp + vision.
"""

from __future__ import annotations

from dataclasses import dataclass

VIT_300M, VIT_6B = "InternViT-300M-448px", "InternViT-6B-448px"
VISION_PARAMS_B = {VIT_300M: 0.3, VIT_6B: 5.9}
HEADROOM = 1.25  # KV cache and activations on top of the weights (a rule of thumb, not a measurement)
GPUS = {"A100/H100 80 GB": 80.0, "L4 24 GB": 24.0}


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

    @property
    def vision_params_b(self) -> float:
        return VISION_PARAMS_B[self.vision.removesuffix("-V2_5")]

    def gb_per_gpu(self, tp: int) -> float:
        """bf16 weights one GPU of a tp replica holds: its shard of the language model and the whole vision tower."""
        return ((self.params_b - self.vision_params_b) / tp + self.vision_params_b) * 2

    def gpus_needed(self, gpu_gb: float, *, headroom: float = HEADROOM) -> int:
        """Smallest power-of-two tp whose GPUs each hold their weights plus headroom; 16 means it does not fit
        one 8-GPU node."""
        for tp in (1, 2, 4, 8):
            if self.gb_per_gpu(tp) * headroom <= gpu_gb:
                return tp
        return 16


def sizing_table() -> list[dict[str, str]]:
    """The README's sizing table: weights, smallest tp per GPU type, replicas per 8-GPU node."""
    rows = []
    for m in MODELS:
        row = {"model": m.name, "bf16 weights": f"{m.weights_gb:.0f} GB"}
        for gpu, gb in GPUS.items():
            tp = m.gpus_needed(gb)
            row[f"tp on {gpu}"] = str(tp) if tp <= 8 else "-"
            row[f"replicas per 8 x {gpu.split()[0]}"] = str(8 // tp) if tp <= 8 else "-"
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, str]]) -> str:
    """Rows as a Markdown table."""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r[h] for h in head) + " |" for r in rows])


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
