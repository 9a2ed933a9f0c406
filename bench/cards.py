"""The model cards' preprocessing, as the benches' reference: `load_image` and `load_video` with the cards' structure.

The cards (shared/seeds) build the per-tile transform with torchvision:
    T.Compose([T.Lambda(lambda img: img.convert('RGB') if img.mode != 'RGB' else img),
               T.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC),
               T.ToTensor(), T.Normalize(mean=MEAN, std=STD)])
torchvision is not installed here (and must not be), so `build_transform` reproduces, operation for operation, what
torchvision's functional API does on a PIL RGB image (torchvision/transforms/functional.py and _functional_tensor.py):
- Resize: `F.resize` computes the output size and returns the image itself when it already has that size (every
  448x448 tile); otherwise it calls `PIL.Image.resize((w, h), BICUBIC)`.
- ToTensor: `torch.from_numpy(np.array(pic, np.uint8, copy=True))` (Pillow's array interface, i.e. `tobytes()`, then
  a copy), `.view(h, w, 3)`, `.permute((2, 0, 1)).contiguous()` (a uint8 CHW copy), `.to(float32).div(255)`.
- Normalize: `tensor.clone()`, mean/std as tensors, the `(std == 0).any()` check, then `sub_(mean).div_(std)`.
So the stand-in is neither slower nor faster than torchvision by construction: same calls, same copies, same order.

These functions are deliberately the cards' code paths (a set of grids sorted by tile count, crop per tile, per-tile
float transform, torch.stack / torch.cat); they are the baseline the pipeline is measured and checked against.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- torchvision stand-in (same operations as torchvision.transforms.functional on PIL images) -------------------

def tv_resize(img: Image.Image, size: tuple[int, int], interpolation: int = Image.Resampling.BICUBIC) -> Image.Image:
    """torchvision F.resize for a PIL image and a (h, w) size: a no-op when the size already matches."""
    height, width = size
    if (img.height, img.width) == (height, width):
        return img
    return img.resize((width, height), interpolation)


def tv_to_tensor(pic: Image.Image) -> torch.Tensor:
    """torchvision F.to_tensor for an 8-bit PIL image."""
    img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
    img = img.view(pic.size[1], pic.size[0], len(pic.getbands()))
    img = img.permute((2, 0, 1)).contiguous()
    return img.to(dtype=torch.get_default_dtype()).div(255)


def tv_normalize(tensor: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """torchvision F.normalize (inplace=False)."""
    tensor = tensor.clone()
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device)
    std_t = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device)
    if (std_t == 0).any():
        raise ValueError("std evaluated to zero")
    return tensor.sub_(mean_t.view(-1, 1, 1)).div_(std_t.view(-1, 1, 1))


def build_transform(input_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The cards' T.Compose([Lambda(convert), Resize(BICUBIC), ToTensor(), Normalize()])."""
    steps: list[Callable] = [
        lambda img: img.convert("RGB") if img.mode != "RGB" else img,
        lambda img: tv_resize(img, (input_size, input_size), Image.Resampling.BICUBIC),
        tv_to_tensor,
        lambda t: tv_normalize(t, IMAGENET_MEAN, IMAGENET_STD),
    ]

    def transform(img: Image.Image) -> torch.Tensor:
        for step in steps:
            img = step(img)
        return img

    return transform


# --- the cards' functions ----------------------------------------------------------------------------------------

def find_closest_aspect_ratio(aspect_ratio: float, target_ratios: list[tuple[int, int]], width: int, height: int,
                              image_size: int) -> tuple[int, int]:
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def dynamic_preprocess(image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                       use_thumbnail: bool = False) -> list[Image.Image]:
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if min_num <= i * j <= max_num}
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    target_aspect_ratio = find_closest_aspect_ratio(aspect_ratio, target_ratios, orig_width, orig_height, image_size)
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = ((i % (target_width // image_size)) * image_size, (i // (target_width // image_size)) * image_size,
               ((i % (target_width // image_size)) + 1) * image_size, ((i // (target_width // image_size)) + 1) * image_size)
        processed_images.append(resized_img.crop(box))
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images


def load_image(image_file: str, input_size: int = 448, max_num: int = 12) -> torch.Tensor:
    image = Image.open(image_file).convert("RGB")
    transform = build_transform(input_size=input_size)
    images = dynamic_preprocess(image, image_size=input_size, use_thumbnail=True, max_num=max_num)
    return torch.stack([transform(image) for image in images])


def get_index(bound: tuple[float, float] | None, fps: float, max_frame: int, first_idx: int = 0,
              num_segments: int = 32) -> np.ndarray:
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return np.array([int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)])


def load_video(video_path: str, bound: tuple[float, float] | None = None, input_size: int = 448, max_num: int = 1,
               num_segments: int = 32) -> tuple[torch.Tensor, list[int]]:
    from decord import VideoReader, cpu

    vr = VideoReader(video_path, ctx=cpu(0), num_threads=1)
    max_frame = len(vr) - 1
    fps = float(vr.get_avg_fps())
    pixel_values_list, num_patches_list = [], []
    transform = build_transform(input_size=input_size)
    frame_indices = get_index(bound, fps, max_frame, first_idx=0, num_segments=num_segments)
    for frame_index in frame_indices:
        img = Image.fromarray(vr[frame_index].asnumpy()).convert("RGB")
        img = dynamic_preprocess(img, image_size=input_size, use_thumbnail=True, max_num=max_num)
        pixel_values = torch.stack([transform(tile) for tile in img])
        num_patches_list.append(pixel_values.shape[0])
        pixel_values_list.append(pixel_values)
    return torch.cat(pixel_values_list), num_patches_list
