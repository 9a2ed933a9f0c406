"""Video frame sampling reproduces the cards' facts; decord decodes only the sampled frames from memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import parse_job
from pipeline.images import MediaError
from pipeline.stages import Preprocess
from pipeline.video import VideoLimits, looks_like_video, sample_frame_indices, sample_video
from tests.media import make_video, read_index

CASES = json.loads((Path(__file__).parent / "data" / "frame_cases.json").read_text())["cases"]


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
        from pipeline.video import sample_video
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
