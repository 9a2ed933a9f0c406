"""The CPU stage for compute.engine vllm-native: whole decoded pictures out (vLLM tiles them), with the tile counts the
cards' tiling would make; the model stage reads them back exactly."""

from __future__ import annotations

import numpy as np

from pipeline.config import parse_job
from pipeline.media.decode import pictures_from_bytes, video_frames
from pipeline.stages.model_stage import Requests
from pipeline.stages.preprocess import Preprocess
from tests.conftest import pattern_image
from tests.helpers import job_dict, preprocessed
from tests.media import make_video


def test_images_and_image_sets_leave_whole_with_the_cards_tile_counts(tmp_path):
    images = {"a.png": pattern_image(1344, 896), "b.png": pattern_image(640, 480), "c.png": pattern_image(300, 1200)}
    native = parse_job(job_dict("caption", compute={"engine": "vllm-native"}))
    tiled = preprocessed(parse_job(job_dict("caption")), tmp_path, images)
    got = preprocessed(native, tmp_path, images)
    assert [got["tiles_per_image"][i][0] for i in range(3)] == [7, 13, 5]
    assert [list(t) for t in got["tiles_per_image"]] == [list(t) for t in tiled["tiles_per_image"]]
    assert list(got["num_tiles"]) == list(tiled["num_tiles"])
    todo = Requests()
    for k, (name, image) in enumerate(images.items()):
        row = {key: values[k] for key, values in got.items()}
        (picture,) = todo.samples[todo.add_sample(row)].arrays
        np.testing.assert_array_equal(picture, np.asarray(image))  # decoded, not resized
        assert (row["width"], row["height"]) == image.size and not todo.samples[-1].video
    # an image set: each image whole, the cards' per-image budget (max_tiles // 2 each)
    pair = Preprocess(native).prepare("", [str(tmp_path / "a.png"), str(tmp_path / "b.png")])
    assert pair["tiles_per_image"] == [7, 7] and pair["num_tiles"] == 14 and pair["media_type"] == "images"
    arrays = pictures_from_bytes(pair["pixels"], pair["picture_sizes"])
    np.testing.assert_array_equal(arrays[1], np.asarray(images["b.png"]))


def test_a_videos_sampled_frames_leave_whole(tmp_path):
    data = make_video(30, 10, width=320, height=240)
    (tmp_path / "clip.mp4").write_bytes(data)
    native = parse_job(job_dict("caption", compute={"engine": "vllm-native"}))
    row = Preprocess(native).prepare(str(tmp_path / "clip.mp4"))
    assert row["status"] == "ok" and row["media_type"] == "video" and row["tiles_per_image"] == [1] * 8
    frames = pictures_from_bytes(row["pixels"], row["picture_sizes"])
    np.testing.assert_array_equal(np.stack(frames), video_frames(data, native.video, native.tiling).frames)
    assert row["picture_sizes"] == [[240, 320]] * 8 and row["num_frames"] == 30
    # a broken file is still an error row, not an exception
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    bad = Preprocess(native).prepare(str(tmp_path / "bad.jpg"))
    assert bad["status"] == "error" and bad["error_type"] == "decode_error" and bad["pixels"] is None
