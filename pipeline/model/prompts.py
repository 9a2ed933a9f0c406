"""Prompt text for a sample: the user text, the checkpoint's chat template, and image placeholder expansion.

Pure functions. The layout follows the InternVL cards and transformers' InternVLProcessor:
- one image: `[image, text]`; its placeholder (the image-context token the chat template emits for
  `{"type": "image"}`) becomes `<img>` + context token x image_seq_length x tiles + `</img>`;
- several images: `Image-1: <img>...</img>\nImage-2: <img>...</img>\n{text}` (the cards' multi-image layout);
- a video: the template's video placeholder becomes `Frame1: <img>...</img>\nFrame2: ...` (one block per frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import PromptError


@dataclass(frozen=True)
class ImageTokens:
    """The three special tokens InternVL uses to place an image in the text."""

    start: str = "<img>"
    context: str = "<IMG_CONTEXT>"
    end: str = "</img>"
    video: str = "<video>"

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ImageTokens:
        """Read the names from the tokenizer (native InternVL tokenizers carry them), else the defaults."""
        default = cls()
        return cls(
            start=getattr(tokenizer, "start_image_token", None) or default.start,
            context=getattr(tokenizer, "context_image_token", None) or default.context,
            end=getattr(tokenizer, "end_image_token", None) or default.end,
            video=getattr(tokenizer, "video_token", None) or default.video,
        )

    def block(self, tiles: int, image_seq_length: int) -> str:
        """One image's tokens: start + context x (image_seq_length x tiles) + end."""
        return f"{self.start}{self.context * (image_seq_length * tiles)}{self.end}"


def user_text(*, task: str, prompt: str, question: str | None) -> str:
    """The text the user asks: the caption prompt, or the vqa template filled with the row's question."""
    if task == "vqa":
        if question is None or not str(question).strip():
            raise PromptError("task vqa needs a non-empty 'question' for every row")
        return prompt.replace("{question}", str(question))
    return prompt


def chat_messages(text: str, *, num_images: int = 1, video: bool = False) -> list[dict[str, Any]]:
    """One user turn: the media first (labelled Image-1, Image-2... when there are several), then the text."""
    content: list[dict[str, Any]]
    if video:
        content = [{"type": "video"}]
    elif num_images == 1:
        content = [{"type": "image"}]
    else:
        content = []
        for i in range(num_images):
            content += [{"type": "text", "text": f"Image-{i + 1}: "}, {"type": "image"}]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def expand_image_placeholders(
    rendered: str, *, tiles_per_image: list[int], tokens: ImageTokens, image_seq_length: int, video: bool = False
) -> str:
    """Replace the i-th image placeholder with its image's tokens; for a video, the one video placeholder with
    `Frame{i}: <image tokens>` lines, one per frame (tiles_per_image then holds tiles per frame)."""
    if video:
        if rendered.count(tokens.video) != 1:
            raise PromptError(f"chat template produced {rendered.count(tokens.video)} video placeholders for 1 video")
        frames = "\n".join(f"Frame{i + 1}: {tokens.block(t, image_seq_length)}" for i, t in enumerate(tiles_per_image))
        return rendered.replace(tokens.video, frames)
    parts = rendered.split(tokens.context)
    if len(parts) - 1 != len(tiles_per_image):
        raise PromptError(
            f"chat template produced {len(parts) - 1} image placeholders for {len(tiles_per_image)} images"
        )
    out = [parts[0]]
    for tiles, rest in zip(tiles_per_image, parts[1:]):
        out += [tokens.block(tiles, image_seq_length), rest]
    return "".join(out)
