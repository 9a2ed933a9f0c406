"""The InternVL checkpoints this pipeline serves (from the model cards' tables), with sizing for each.

Parameter counts are approximate (the cards' model sizes); weights are counted in bf16 (2 bytes a parameter).
With tensor parallelism (compute.tp) the language model is sharded over the tp GPUs of a replica while the
vision tower is replicated on each, so a GPU holds lm/tp + vision.

Each entry also knows its shapes (the published configs' vision tower and language model, below), so the GPU
memory split (model/gpu_memory.py) and its table in docs/gpu-memory.md need no download.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VIT_300M, VIT_6B = "InternViT-300M-448px", "InternViT-6B-448px"
VISION_PARAMS_B = {VIT_300M: 0.3, VIT_6B: 5.9}
HEADROOM = 1.25  # KV cache and activations on top of the weights (a rule of thumb, not a measurement)
GPUS = {"A100/H100 80 GB": 80.0, "L4 24 GB": 24.0}

# The published configs' shapes (InternVL's config.json: vision_config, llm_config). Vocabularies are InternVL's
# (the language model's own plus InternVL's image tokens); InternVL keeps lm_head apart from the embeddings.
VISION_CONFIGS = {
    VIT_300M: {"hidden_size": 1024, "num_hidden_layers": 24, "intermediate_size": 4096, "num_attention_heads": 16},
    VIT_6B: {"hidden_size": 3200, "num_hidden_layers": 45, "intermediate_size": 12800, "num_attention_heads": 25},
}
_QWEN, _INTERNLM2 = {"vocab_size": 151674, "max_position_embeddings": 32768}, {"vocab_size": 92553, "max_position_embeddings": 32768}
LANGUAGE_CONFIGS = {  # hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim
    "Qwen2.5-0.5B": (896, 4864, 24, 14, 2, 64, _QWEN),
    "Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 128, _QWEN),
    "Qwen2.5-3B": (2048, 11008, 36, 16, 2, 128, _QWEN),
    "Qwen2.5-7B": (3584, 18944, 28, 28, 4, 128, _QWEN),
    "Qwen2.5-14B": (5120, 13824, 48, 40, 8, 128, _QWEN),
    "Qwen2.5-32B": (5120, 27648, 64, 40, 8, 128, _QWEN),
    "Qwen2.5-72B": (8192, 29568, 80, 64, 8, 128, _QWEN),
    "internlm3-8b-instruct": (4096, 10240, 48, 32, 2, 128, {"vocab_size": 128512, "max_position_embeddings": 32768}),
    "internlm2_5-1_8b-chat": (2048, 8192, 24, 16, 8, 128, _INTERNLM2),
    "internlm2_5-7b-chat": (4096, 14336, 32, 32, 8, 128, _INTERNLM2),
    "internlm2_5-20b-chat": (6144, 16384, 48, 48, 8, 128, _INTERNLM2),
    "Phi-3-mini-128k-instruct": (3072, 8192, 32, 32, 32, 96, {"vocab_size": 32020, "max_position_embeddings": 131072}),
}


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

    def config(self) -> dict[str, Any]:
        """A config.json with this model's shapes (original InternVL layout), for the GPU memory split."""
        width, mlp, layers, heads, kv_heads, head_dim, more = LANGUAGE_CONFIGS[self.language_model.removesuffix("-Instruct")]
        llm = {"hidden_size": width, "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": heads,
               "num_key_value_heads": kv_heads, "head_dim": head_dim, "tie_word_embeddings": False, **more}
        vision = {**VISION_CONFIGS[self.vision.removesuffix("-V2_5")], "image_size": 448, "patch_size": 14}
        return {"vision_config": vision, "llm_config": llm, "downsample_ratio": 0.5, "select_layer": -1}

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


def find_model(name: str) -> ModelInfo | None:
    """The catalogue entry a model path or hub id names (its last path element, `-hf` or not), if any."""
    base = name.rstrip("/").rsplit("/", 1)[-1].removesuffix("-hf").lower()
    return next((m for m in MODELS if m.name.lower() == base), None)


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
