"""Prompt text for a sample: the user text, the checkpoint's chat template, and image placeholder expansion.

Pure functions. The expansion follows transformers' InternVLProcessor: every image placeholder (the image-context
token the chat template emits for `{"type": "image"}`) becomes `<img>` + context token x image_seq_length x tiles
+ `</img>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class PromptError(ValueError):
    """A prompt that cannot be built for a row (e.g. vqa without a question)."""


@dataclass(frozen=True)
class ImageTokens:
    """The three special tokens InternVL uses to place an image in the text."""

    start: str = "<img>"
    context: str = "<IMG_CONTEXT>"
    end: str = "</img>"

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ImageTokens:
        """Read the names from the tokenizer (native InternVL tokenizers carry them), else the defaults."""
        default = cls()
        return cls(
            start=getattr(tokenizer, "start_image_token", None) or default.start,
            context=getattr(tokenizer, "context_image_token", None) or default.context,
            end=getattr(tokenizer, "end_image_token", None) or default.end,
        )


def user_text(*, task: str, prompt: str, question: str | None) -> str:
    """The text the user asks: the caption prompt, or the vqa template filled with the row's question."""
    if task == "vqa":
        if question is None or not str(question).strip():
            raise PromptError("task vqa needs a non-empty 'question' for every row")
        return prompt.replace("{question}", str(question))
    return prompt


def chat_messages(text: str, *, num_images: int) -> list[dict[str, Any]]:
    """One user turn: the images first, then the text (the layout transformers' InternVL processor expects)."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def expand_image_placeholders(
    rendered: str, *, tiles_per_image: list[int], tokens: ImageTokens, image_seq_length: int
) -> str:
    """Replace the i-th image placeholder with start + context x (image_seq_length x tiles) + end."""
    parts = rendered.split(tokens.context)
    if len(parts) - 1 != len(tiles_per_image):
        raise PromptError(
            f"chat template produced {len(parts) - 1} image placeholders for {len(tiles_per_image)} images"
        )
    out = [parts[0]]
    for tiles, rest in zip(tiles_per_image, parts[1:]):
        out.append(f"{tokens.start}{tokens.context * (image_seq_length * tiles)}{tokens.end}")
        out.append(rest)
    return "".join(out)


def num_image_tokens(tiles: int, *, image_seq_length: int = 256) -> int:
    """Tokens one image of `tiles` tiles takes in the prompt: start + end + image_seq_length per tile."""
    return 2 + image_seq_length * tiles
