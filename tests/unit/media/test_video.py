"""Video frame sampling reproduces the cards' facts; decord decodes only the sampled frames from memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pipeline.config import parse_job
from pipeline.errors import MediaError
from pipeline.media.video import VideoLimits, looks_like_video, sample_frame_indices, sample_video
from pipeline.stages.preprocess import Preprocess
from tests.conftest import DATA
from tests.media import make_video, read_index

CASES = json.loads((DATA / "frame_cases.json").read_text())["cases"]


def case_id(c: dict) -> str:
    return f"{c['num_frames']}f-{c['fps']}fps-{c['bound']}-{c['num_segments']}seg"


def bound_kwargs(case: dict) -> dict:
    return dict(start_s=case["bound"][0], end_s=case["bound"][1]) if case["bound"] else {}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_indices_match_cards(case):
    got = sample_frame_indices(num_frames=case["num_frames"], fps=case["fps"], num_segments=case["num_segments"],
                               **bound_kwargs(case))
    assert got == case["indices"]


@pytest.mark.parametrize("case", [c for c in CASES if c["fps"] == int(c["fps"]) and c["num_frames"] <= 1000], ids=case_id)
def test_decoded_frames_are_the_facts_frames(case):
    """Encode a real video with the case's frame count and rate; decord must decode exactly the facts' frames."""
    data = make_video(case["num_frames"], case["fps"], width=64, height=48)
    video = sample_video(data, num_segments=case["num_segments"], **bound_kwargs(case))
    assert video.indices == case["indices"] and video.num_frames == case["num_frames"] and video.fps == case["fps"]
    assert [read_index(f) for f in video.frames] == case["indices"]
    assert video.frames.shape == (case["num_segments"], 48, 64, 3) and video.frames.dtype == np.uint8


def test_variable_frame_rate():
    times = [0, 0.03, 0.1, 0.12, 0.3, 0.31, 0.5, 0.9, 1.0, 1.2, 1.21, 1.5]
    data = make_video(len(times), 10, frame_times=times)
    video = sample_video(data, num_segments=4)
    assert video.num_frames == len(times)
    assert video.indices == sample_frame_indices(num_frames=len(times), fps=video.fps, num_segments=4)
    assert [read_index(f) for f in video.frames] == video.indices


def test_one_frame_video():
    video = sample_video(make_video(1, 30), num_segments=8)
    assert video.indices == [0] * 8 and [read_index(f) for f in video.frames] == [0] * 8


def test_start_past_the_end_is_a_clear_error_not_a_bad_index():
    with pytest.raises(ValueError, match="past the end"):
        sample_frame_indices(num_frames=100, fps=25, num_segments=8, start_s=10, end_s=20)
    with pytest.raises(MediaError) as err:
        sample_video(make_video(50, 25), num_segments=4, start_s=5.0, end_s=6.0)
    assert err.value.error_type == "bad_input"


def test_end_past_the_end_is_clamped_to_the_last_frame():
    indices = sample_frame_indices(num_frames=100, fps=25, num_segments=4, start_s=2, end_s=60)
    assert max(indices) <= 99 and indices == sorted(indices)


@pytest.mark.parametrize("limits, pattern", [
    (VideoLimits(max_duration_s=1.0), "frames"), (VideoLimits(max_frames=10), "frames"), (VideoLimits(max_pixels=100), "pixel"),
])
def test_caps_refuse_before_decoding(limits, pattern):
    with pytest.raises(MediaError, match=pattern) as err:
        sample_video(make_video(60, 30), num_segments=4, limits=limits)
    assert err.value.error_type == "too_large"


def test_garbage_is_decode_error():
    with pytest.raises(MediaError) as err:
        sample_video(b"\x00\x00\x00\x18ftypmp42 not really a video", num_segments=2)
    assert err.value.error_type == "decode_error"


@pytest.mark.parametrize("kind", ["mp4", "mov", "avi", "mkv", "webm"])
def test_containers_detected_by_content(kind):
    assert looks_like_video(make_video(3, 10, kind=kind))


def test_preprocess_tiles_each_frame(tmp_path):
    (tmp_path / "clip").write_bytes(make_video(40, 20, width=640, height=360))  # no extension: found by content
    job = parse_job({"task": "caption", "input": "x", "output": "y", "model": "m",
                     "video": {"num_frames": 4, "tiles_per_frame": 3}})
    row = Preprocess(job).prepare(str(tmp_path / "clip"))
    assert row["status"] == "ok" and row["media_type"] == "video"
    assert row["frame_indices"] == sample_frame_indices(num_frames=40, fps=20, num_segments=4)
    assert row["tiles_per_image"] == [3, 3, 3, 3]  # 640x360 -> 2x1 grid + thumbnail per frame
    assert row["num_tiles"] == 12 and len(row["pixels"]) == 12 * 448 * 448 * 3
    assert (row["num_frames"], row["fps"], row["duration_s"], row["width"], row["height"]) == (40, 20.0, 2.0, 640, 360)


def test_long_video_memory_stays_bounded(tmp_path):
    """Sampling 8 frames of a 5-minute video must not decode it whole (that would take ~440 MB here)."""
    path = tmp_path / "long.mp4"
    path.write_bytes(make_video(9000, 30, width=160, height=102))
    script = textwrap.dedent(f"""
        import resource, sys
        from pipeline.media.video import sample_video
        data = open({str(path)!r}, "rb").read()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        video = sample_video(data, num_segments=8)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(video.num_frames, (after - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    frames, grown_mb = map(int, out.stdout.split())
    whole_mb = 9000 * 160 * 102 * 3 // 2**20
    assert frames == 9000
    assert grown_mb < 100 < whole_mb, f"peak memory grew {grown_mb} MB while sampling (whole video: {whole_mb} MB)"


# --- the PyAV path: decord's exact frames, decoding fewer frames ------------------------------------------------

import io  # noqa: E402
from fractions import Fraction  # noqa: E402

import av  # noqa: E402

from pipeline.media.video import Unverified, sample_with_decord, sample_with_pyav  # noqa: E402


def encode(width: int, height: int, frames: int = 60, *, codec: str = "libx264", pix_fmt: str = "yuv420p",
           options: dict | None = None, rotation: int = 0) -> bytes:
    """A textured scene panning right, with the codec's defaults (libx264: GOP 250, B-frames, b-pyramid)."""
    if codec not in av.codecs_available:
        pytest.skip(f"PyAV has no {codec} encoder here")
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = options or {}
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            pixels = np.ascontiguousarray(np.roll(scene, 3 * i, axis=1)[:height, :width])
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def assert_same(a, b):
    assert (a.indices, a.fps, a.num_frames) == (b.indices, b.fps, b.num_frames)
    assert a.frames.shape == b.frames.shape and np.array_equal(a.frames, b.frames)


VERIFIED = {
    "h264-bframes-1080p": lambda: encode(1920, 1080, 30),
    "h264-long-gop": lambda: encode(320, 240, 300, options={"preset": "veryfast"}),
    "h264-odd-size": lambda: encode(334, 250),
    "h264-yuvj420p": lambda: encode(320, 240, pix_fmt="yuvj420p"),
    "h264-yuv422p": lambda: encode(320, 240, pix_fmt="yuv422p"),
    "h264-yuv444p": lambda: encode(320, 240, pix_fmt="yuv444p"),
    "hevc": lambda: encode(320, 240, codec="libx265", options={"preset": "ultrafast", "log-level": "error"}),
    "mpeg4-mp4": lambda: make_video(40, 25, width=160, height=102),
    "mpeg4-avi": lambda: make_video(40, 25, width=160, height=120, kind="avi"),
    "mpeg4-mkv": lambda: make_video(40, 25, width=160, height=120, kind="mkv"),
    "mpeg4-mov": lambda: make_video(40, 25, width=160, height=120, kind="mov"),
    "vp9-webm": lambda: make_video(40, 25, width=160, height=120, kind="webm"),
    "vfr": lambda: make_video(12, 10, frame_times=[0, 0.03, 0.1, 0.12, 0.3, 0.31, 0.5, 0.9, 1.0, 1.2, 1.21, 1.5]),
}


@pytest.mark.parametrize("name", list(VERIFIED))
@pytest.mark.parametrize("segments, bound", [(6, {}), (16, {}), (4, dict(start_s=0.5, end_s=1.1))])
def test_pyav_gives_decords_frames(name, segments, bound):
    """Same indices, fps, frame count and pixels as decord (the cards' decoder) on every verified kind of stream."""
    data = VERIFIED[name]()
    assert_same(sample_with_pyav(data, num_segments=segments, **bound),
                sample_with_decord(data, num_segments=segments, **bound))


@pytest.mark.parametrize("kind, data", [
    ("10-bit", lambda: encode(320, 240, pix_fmt="yuv420p10le")),
    ("rotated", lambda: encode(320, 240, 30, rotation=90)),
])
def test_unverified_streams_go_to_decord(kind, data):
    data = data()
    with pytest.raises(Unverified):
        sample_with_pyav(data, num_segments=4)
    assert_same(sample_video(data, num_segments=4), sample_with_decord(data, num_segments=4))


def test_verified_streams_do_not_touch_decord(monkeypatch):
    """The faster path is really taken for a verified stream (a regression would silently cost ~1.5x)."""
    import pipeline.media.video as video

    def no_decord(*args, **kwargs):
        raise AssertionError("decord used for a verified stream")

    monkeypatch.setattr(video, "sample_with_decord", no_decord)
    sampled = video.sample_video(make_video(30, 25, width=64, height=48), num_segments=4)
    assert [read_index(f) for f in sampled.frames] == sampled.indices
