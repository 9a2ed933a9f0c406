"""processor_config.json for a native checkpoint: what vLLM needs to serve it, written by `convert` and
`make-tiny-model`.

vLLM builds the checkpoint's `InternVLProcessor` even though our engine hands it embeddings, never pixels: it reads
the image tokens and image_seq_length from it to expand each `<IMG_CONTEXT>`, and it does not start without both
sub-processors. The classes' own defaults (CLIP mean/std, 384 px, no tiling) are wrong for InternVL, so we write
the cards' preprocessing: 448 px tiles, 1..max_tiles tiles plus a thumbnail, bicubic, ImageNet mean/std. Our
engines never run these processors (tiles come from pipeline/media/tiling.py); they only have to load, and had
better be right for anyone else who uses the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.media.tiling import IMAGENET_MEAN, IMAGENET_STD, TILE_SIZE

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
DEFAULT_MAX_TILES = 12


def processor_config(*, image_seq_length: int, tile_size: int = TILE_SIZE,
                     max_tiles: int = DEFAULT_MAX_TILES) -> dict[str, Any]:
    """processor_config.json as transformers 5's InternVLProcessor saves it (image and video processor settings
    nested), with the cards' preprocessing; written as JSON, so no torchvision is needed to write it."""
    common = dict(size={"height": tile_size, "width": tile_size}, resample=3,  # PIL bicubic, as the cards' resize
                  do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                  image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True)
    return {
        "processor_class": "InternVLProcessor",
        "image_seq_length": image_seq_length,
        "image_processor": dict(common, image_processor_type="GotOcr2ImageProcessor", crop_to_patches=True,
                                min_patches=1, max_patches=max_tiles),
        "video_processor": dict(common, video_processor_type="InternVLVideoProcessor", do_sample_frames=False,
                                initial_shift=True, return_metadata=False),
    }


def has_processor(path: str | Path) -> bool:
    """Whether a checkpoint folder carries processor settings vLLM can load."""
    return any((Path(path) / name).exists() for name in PROCESSOR_FILES)


def write_processor(out_dir: str | Path, *, image_seq_length: int, tile_size: int = TILE_SIZE,
                    max_tiles: int = DEFAULT_MAX_TILES) -> None:
    """Write processor_config.json into a native checkpoint folder (the tokenizer and chat template are already
    there: the processor reads them from the same folder)."""
    config = processor_config(image_seq_length=image_seq_length, tile_size=tile_size, max_tiles=max_tiles)
    (Path(out_dir) / PROCESSOR_FILES[0]).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
