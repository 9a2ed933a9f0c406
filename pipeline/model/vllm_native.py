"""`compute.engine: vllm-native`: vLLM's own InternVL path, the baseline that Ray Data LLM runs, behind the same stages
and output columns as the other engines.

Pictures go to vLLM as they are (PIL images in `multi_modal_data`: a sample's images, or its video's sampled
frames, each an image); vLLM's processor tiles them (transformers' InternVL image processor: its own grid choice
and torchvision resize, on the engine's front-end process), its vision tower encodes them in its own worker
process, and its caches apply (processor, encoder and prefix cache). Nothing of ours touches a pixel after
decoding: the CPU stage only decodes (and samples a video's frames), then ships the pictures
(`pipeline.media.decode.pictures_from_bytes`).

The prompt is ours with one `<IMG_CONTEXT>` per picture (a video frame: `Frame1: <IMG_CONTEXT>`), which vLLM
expands by the tile count its processor chose; a sample's tile budget goes with each request
(`mm_processor_kwargs`: max_patches as our CPU stage would allow: tiling.max_tiles shared by a sample's images,
video.tiles_per_frame per frame). Row columns that count tiles or prompt tokens (`num_tiles`, `num_input_tokens`)
are the cards' tiling's, computed by the CPU stage from each picture's size; vLLM's processor may choose another
grid (tests/vllm/test_vllm_native.py measures how often, and how far its tiles are from the cards').
Generation, sampling, schemas and scoring are VLLMEngine's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import TilingConfig, VideoConfig
from pipeline.errors import ModelLoadError
from pipeline.model.transformers_engine import loading, open_checkpoint, require_chat_template
from pipeline.model.processor_files import has_processor
from pipeline.model.vllm_engine import VLLMEngine


@dataclass(frozen=True)
class Pictures:
    """One sample as vllm-native takes it: its decoded pictures (uint8 RGB, (h, w, 3) each) and whether they are a
    video's frames."""

    arrays: list[np.ndarray]
    video: bool = False


def tile_budget(tiling: TilingConfig, video: VideoConfig, pictures: Pictures) -> dict[str, int]:
    """The processor's tile limits for one sample, as the CPU stage allows ours (stages/preprocess.py): a video's
    frames video.tiles_per_frame each; a sample's images share tiling.max_tiles (max_tiles // n each)."""
    most = video.tiles_per_frame if pictures.video else max(1, tiling.max_tiles // len(pictures.arrays))
    return {"min_patches": min(tiling.min_tiles, most), "max_patches": most}


class VLLMNativeEngine(VLLMEngine):
    """A replica on vLLM's own InternVL path: no vision tower of ours; vLLM tiles, encodes and generates."""

    embeddings = False

    def __init__(self, config: Any, tokenizer: Any, plan: Any, path: str, *, tiling: TilingConfig | None = None,
                 video: VideoConfig | None = None, options: Mapping[str, Any] | None = None, tp: int = 1) -> None:
        self.tiling = tiling or TilingConfig()
        self.video = video or VideoConfig()
        super().__init__(config, tokenizer, plan, path, options=options, tp=tp)

    @classmethod
    def load(cls, model: str, *, revision: str | None = None, tp: int = 1, options: Mapping[str, Any] | None = None,
             tiling: TilingConfig | None = None, video: VideoConfig | None = None, **where: Any) -> VLLMNativeEngine:
        """Load a native (or convertible original-format) checkpoint for vLLM alone: only its tokenizer and config
        here. `options`: vLLM engine arguments; `where`: engine.open_checkpoint's arguments."""
        from transformers import AutoConfig, AutoTokenizer

        path, plan = open_checkpoint(model, revision=revision, **where)
        if not has_processor(path):
            raise ModelLoadError(f"model {model!r} has no processor_config.json, which vLLM's own InternVL path "
                                 "tiles pictures with: convert the checkpoint again with `internvl-batch convert`")
        with loading(model):
            tokenizer = AutoTokenizer.from_pretrained(path)
            config = AutoConfig.from_pretrained(path)
        require_chat_template(model, tokenizer)
        return cls(config, tokenizer, plan, path, tiling=tiling, video=video, options=options, tp=tp)

    async def _features(self, samples: Sequence[Pictures]) -> list[Pictures]:
        """Nothing to encode here: vLLM's processor and vision tower take the pictures."""
        return list(samples)

    def _requests(self, prompts: Sequence[list[int]], features: Sequence[Pictures],
                  owners: Sequence[int]) -> list[dict[str, Any]]:
        """One vLLM prompt per prompt: compact ids (one `<IMG_CONTEXT>` per picture), its sample's pictures as PIL
        images and the sample's tile limits."""
        from PIL import Image

        requests = []
        for row, (ids, owner) in enumerate(zip(prompts, owners)):
            compact, sizes = self.split_prompt(ids)
            pictures = features[owner]
            if len(sizes) != len(pictures.arrays):
                raise ValueError(f"prompt {row} has {len(sizes)} images for {len(pictures.arrays)} pictures")
            request: dict[str, Any] = {"prompt_token_ids": compact}
            if sizes:
                request["multi_modal_data"] = {"image": [Image.fromarray(a, "RGB") for a in pictures.arrays]}
                request["mm_processor_kwargs"] = tile_budget(self.tiling, self.video, pictures)
            requests.append(request)
        return requests
