"""The offline tiny InternVL checkpoint loads natively, is deterministic and its output depends on the image."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GenerationConfig, InternVLForConditionalGeneration

from pipeline.embedded.tiny_model import IMAGE_SEQ_LENGTH, make_tiny_model

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
EXPECTED_PROMPT = (
    "<|im_start|>system\nYou are InternVL, a tiny test model.<|im_end|>\n"
    "<|im_start|>user\n<IMG_CONTEXT>\nDescribe.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> InternVLForConditionalGeneration:
    return InternVLForConditionalGeneration.from_pretrained(model_dir).eval()


def _tiles(rgb: torch.Tensor, num_tiles: int = 1) -> torch.Tensor:
    """Normalise a (3, 448, 448) image in [0, 1] and repeat it as `num_tiles` tiles."""
    return ((rgb - MEAN) / STD).unsqueeze(0).repeat(num_tiles, 1, 1, 1).float()


def _images() -> dict[str, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 448), torch.linspace(0, 1, 448), indexing="ij")
    return {
        "noise": torch.rand(3, 448, 448, generator=torch.Generator().manual_seed(1)),
        "constant": torch.tensor([0.5, 0.15, 0.1]).view(3, 1, 1).expand(3, 448, 448),
        "gradient_h": torch.stack([xs, 1 - xs, torch.full_like(xs, 0.5)]),
        "gradient_v": torch.stack([torch.full_like(ys, 0.2), ys, 1 - ys]),
    }


def _generate(model, tokenizer, pixel_values: torch.Tensor) -> list[int]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_tokens = "<img>" + "<IMG_CONTEXT>" * IMAGE_SEQ_LENGTH * pixel_values.shape[0] + "</img>"
    inputs = tokenizer(text.replace("<IMG_CONTEXT>", image_tokens), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, pixel_values=pixel_values, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_files_and_config(model_dir: Path, model: InternVLForConditionalGeneration, tokenizer) -> None:
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert {"tokenizer_config.json", "chat_template.jinja"} <= names
    assert 1e5 < sum(p.numel() for p in model.parameters()) < 2e6
    config = model.config
    assert config.image_seq_length == 256 and config.downsample_ratio == 0.5
    assert tuple(config.vision_config.image_size) == (448, 448) and tuple(config.vision_config.patch_size) == (14, 14)
    assert config.text_config.model_type == "qwen2" and config.text_config.max_position_embeddings >= 8192
    assert config.text_config.vocab_size >= len(tokenizer)
    assert config.tie_word_embeddings == config.text_config.tie_word_embeddings
    # vLLM's CPU attention needs head_dim >= 32; its InternVL processor needs processor_config.json
    text = config.text_config
    assert (text.num_attention_heads, text.num_key_value_heads, text.hidden_size // text.num_attention_heads) == (2, 1, 32)
    processor = json.loads((model_dir / "processor_config.json").read_text())
    assert processor["processor_class"] == "InternVLProcessor" and processor["image_seq_length"] == IMAGE_SEQ_LENGTH
    assert processor["image_processor"]["max_patches"] == 12 and processor["image_processor"]["size"]["height"] == 448


def test_earlier_head_layout_keeps_the_weights(model_dir: Path, tmp_path: Path) -> None:
    """text_head_dim=16 (4 heads, 2 key/value heads): the same seeded weights, split into heads differently."""
    old = make_tiny_model(tmp_path / "old", seed=0, text_head_dim=16)
    assert json.loads((old / "config.json").read_text())["text_config"]["num_attention_heads"] == 4
    a, b = load_file(model_dir / "model.safetensors"), load_file(old / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="text_head_dim"):
        make_tiny_model(tmp_path / "bad", text_head_dim=8)


def test_tokenizer_special_tokens(model_dir: Path, model: InternVLForConditionalGeneration, tokenizer) -> None:
    assert 256 < len(tokenizer) <= 1024
    assert (tokenizer.start_image_token, tokenizer.end_image_token) == ("<img>", "</img>")
    assert (tokenizer.context_image_token, tokenizer.video_token) == ("<IMG_CONTEXT>", "<video>")
    for name in ("start_image_token", "end_image_token", "context_image_token", "video_token"):
        token = getattr(tokenizer, name)
        assert getattr(tokenizer, f"{name}_id") == tokenizer.convert_tokens_to_ids(token)
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [getattr(tokenizer, f"{name}_id")]
    assert model.config.image_token_id == tokenizer.context_image_token_id
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    im_start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"] == [im_start_id]
    generation_config = GenerationConfig.from_pretrained(model_dir)
    assert generation_config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation_config.pad_token_id == tokenizer.pad_token_id


def test_chat_template(model_dir: Path, tokenizer) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == EXPECTED_PROMPT
    assert (model_dir / "chat_template.jinja").read_text() == tokenizer.chat_template
    with_system = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]},
    ]
    assert tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<video>\nHi<|im_end|>\n"
    )


def test_deterministic(model_dir: Path, tmp_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again", seed=0)
    assert (again / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    other = make_tiny_model(tmp_path / "other", seed=1)
    a, b = load_file(model_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_forward_is_finite(model: InternVLForConditionalGeneration, tokenizer) -> None:
    text = EXPECTED_PROMPT.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * IMAGE_SEQ_LENGTH * 2 + "</img>")
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs, pixel_values=_tiles(_images()["noise"], 2)).logits
    assert torch.isfinite(logits).all() and logits.abs().max() < 50


@pytest.mark.parametrize(("first", "second"), [("noise", "constant"), ("gradient_h", "gradient_v")])
def test_generation_depends_on_image(model, tokenizer, first: str, second: str) -> None:
    images = _images()
    out_a = _generate(model, tokenizer, _tiles(images[first]))
    out_b = _generate(model, tokenizer, _tiles(images[second]))
    assert out_a != out_b
    for out in (out_a, out_b):
        assert len(out) == MAX_NEW_TOKENS and tokenizer.eos_token_id not in out
        assert len(tokenizer.decode(out, skip_special_tokens=True).split()) >= MAX_NEW_TOKENS // 2


def test_multi_tile_generation(model, tokenizer) -> None:
    out = _generate(model, tokenizer, _tiles(_images()["gradient_h"], num_tiles=3))
    assert len(out) == MAX_NEW_TOKENS


def test_demo_help_names_the_folder_it_uses():
    """`internvl-batch demo --help` said the default workdir was a temp dir; it is ./internvl-batch-demo (kept)."""
    import inspect

    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.embedded import DEMO_WORKDIR
    from pipeline.embedded.demo import run_demo

    result = CliRunner().invoke(app, ["demo", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert f"./{DEMO_WORKDIR}" in result.output and "temp dir" not in result.output
    assert "Path(DEMO_WORKDIR)" in inspect.getsource(run_demo)  # the folder the help names is the one used
