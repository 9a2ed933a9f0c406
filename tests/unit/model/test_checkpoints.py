"""Remote checkpoints are copied once per node into the cache, atomically, and reused."""

import fsspec
import pytest

from pipeline.errors import ModelLoadError
from pipeline.model.checkpoints import cache_checkpoint, check_checkpoint, resolve_checkpoint


@pytest.fixture()
def remote_model():
    fs = fsspec.filesystem("memory")
    fs.pipe("/models/tiny/config.json", b'{"model_type": "internvl"}')
    fs.pipe("/models/tiny/model.safetensors", b"weights")
    fs.pipe("/models/tiny/sub/extra.json", b"{}")
    yield "memory://models/tiny"
    fs.rm("/models", recursive=True)


def test_copied_once_then_reused(remote_model, tmp_path):
    first = cache_checkpoint(remote_model, cache_dir=tmp_path)
    assert (first / "config.json").read_bytes() == b'{"model_type": "internvl"}'
    assert (first / "sub" / "extra.json").exists()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    fsspec.filesystem("memory").pipe("/models/tiny/model.safetensors", b"changed")
    second = cache_checkpoint(remote_model, cache_dir=tmp_path)
    assert second == first and (second / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folders left behind
    assert resolve_checkpoint(remote_model, cache_dir=tmp_path) == str(first)


def test_remote_without_config_fails_fast(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        check_checkpoint("memory://models/none")
    with pytest.raises(ModelLoadError, match="no config.json"):
        cache_checkpoint("memory://models/none", cache_dir=tmp_path)


def test_hub_ids_pass_through():
    assert resolve_checkpoint("OpenGVLab/InternVL3-1B-hf") == "OpenGVLab/InternVL3-1B-hf"
