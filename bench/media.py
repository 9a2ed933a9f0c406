"""Benchmark media made offline: photo-like JPEGs and realistic H.264 videos, cached on disk between runs.

No real photos or videos are available here, so we synthesise what drives the costs we measure:
- `noisy_photo`: smooth colour waves plus strong per-pixel sensor noise: a worst case for JPEG entropy decoding
  (~3 bits/pixel at quality 90, like a high-ISO phone photo) and for any shortcut that changes how noise is filtered.
- `natural_photo`: a 1/f ("pink") multi-octave texture, as natural images have, with sharp-edged objects and mild
  sensor noise (~1.5-2 bits/pixel at quality 90, like an ordinary daylight phone photo).
- `realistic_video`: a photo-like scene panning under the camera with temporal sensor noise, encoded by libx264 with
  its defaults (GOP 250, B-frames with b-pyramid, CABAC) at crf 23: decoders must run through long dependency chains
  between keyframes, as with real camera or web videos.
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CACHE = Path(os.environ.get("INTERNVL_BENCH_CACHE", "/tmp/internvl-bench-cache"))


def cached(name: str, make) -> Path:
    """A file under the cache dir, made once by `make() -> bytes` (keyed by name: put every parameter in it)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / name
    if not path.exists():
        tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
        tmp.write_bytes(make())
        tmp.replace(path)
    return path


def noisy_photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour waves plus Gaussian noise (sigma 12): the entropy-heavy worst case."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(x / (37 + 11 * c) + y / (53 + 7 * c) + rng.uniform(0, 6)) for c in range(3)],
                   axis=-1)
    img += rng.normal(0, 12, size=img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _pink(width: int, height: int, rng: np.random.Generator, octaves: int = 9, slope: float = 0.6) -> np.ndarray:
    """1/f-like texture in [-1, 1]-ish: random octaves, each upsampled bicubically, amplitude ~ scale**slope.

    slope 0.6 keeps enough fine detail that a 12 MP picture is ~2.4 MB at JPEG quality 90 (~1.6 bits/pixel), as an
    ordinary phone photo; slope 1 would look like clouds at the pixel level."""
    out = np.zeros((height, width), np.float32)
    for k in range(octaves):
        w, h = max(2, width >> k), max(2, height >> k)
        layer = Image.fromarray(rng.normal(0, 1, (h, w)).astype(np.float32), "F").resize((width, height),
                                                                                        Image.Resampling.BICUBIC)
        out += np.asarray(layer) * (2.0 ** (k * slope))
    return out / (2.0 ** ((octaves - 1) * slope))


def natural_photo(width: int, height: int, seed: int) -> Image.Image:
    """1/f texture (luma + weaker chroma), a few dozen sharp-edged objects, sensor noise sigma 2."""
    rng = np.random.default_rng(seed)
    luma = 120 + 90 * _pink(width, height, rng)
    chroma = [25 * _pink(width, height, rng, octaves=7) for _ in range(2)]
    img = np.stack([luma + chroma[0], luma - 0.5 * chroma[0] - 0.5 * chroma[1], luma + chroma[1]], axis=-1)
    base = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    shapes = Image.new("RGB", (width, height))
    mask = Image.new("L", (width, height), 0)
    draw, draw_mask = ImageDraw.Draw(shapes), ImageDraw.Draw(mask)
    for _ in range(40):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.02, 0.15) * min(width, height)
        box = [cx - r, cy - r * rng.uniform(0.3, 1.5), cx + r, cy + r * rng.uniform(0.3, 1.5)]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse(box, fill=colour)
            draw_mask.ellipse(box, fill=255)
        else:
            draw.rectangle(box, fill=colour)
            draw_mask.rectangle(box, fill=255)
    # objects keep the scene's texture (lit by it), so they are not flat colour
    objects = np.asarray(shapes).astype(np.float32) * (0.6 + 0.4 * (luma[..., None] / 255.0))
    covered = (np.asarray(mask) > 0)[..., None]
    out = np.where(covered, objects, np.asarray(base, np.float32))
    out += rng.normal(0, 2, size=out.shape).astype(np.float32)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def camera_jpeg(kind: str, width: int, height: int, seed: int, quality: int = 90) -> Path:
    """A cached photo-like JPEG (`kind` is 'noisy' or 'natural')."""
    make = {"noisy": noisy_photo, "natural": natural_photo}[kind]
    return cached(f"{kind}-{width}x{height}-s{seed}-q{quality}.jpg", lambda: jpeg(make(width, height, seed), quality))


def realistic_video(seconds: float, fps: int, width: int, height: int, *, seed: int = 0, crf: int = 23,
                    preset: str = "veryfast") -> bytes:
    """A panning photo-like scene with temporal noise, libx264 defaults otherwise (GOP 250, B-frames, b-pyramid)."""
    import av

    frames = int(round(seconds * fps))
    rng = np.random.default_rng(seed)
    canvas = np.asarray(natural_photo(width + frames // 2 + 8, height + frames // 4 + 8, seed))
    noise = [rng.integers(-14, 15, size=(height, width, 3), dtype=np.int16) for _ in range(7)]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": preset, "crf": str(crf)}
        for i in range(frames):
            x0, y0 = i // 2, i // 4
            pixels = np.clip(canvas[y0:y0 + height, x0:x0 + width] + noise[i % len(noise)], 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def camera_video(seconds: float, fps: int, width: int, height: int, seed: int = 0) -> Path:
    """A cached `realistic_video`."""
    return cached(f"x264-{width}x{height}-{fps}fps-{seconds:g}s-s{seed}.mp4",
                  lambda: realistic_video(seconds, fps, width, height, seed=seed))

