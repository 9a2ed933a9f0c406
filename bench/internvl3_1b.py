"""InternVL3-1B's architecture (InternViT-300M-448px-V2_5, pixel shuffle, MLP projector, Qwen2.5-0.5B) as a
native transformers config, and a randomly initialised checkpoint of it: the bench's model, no download."""

from __future__ import annotations

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

