"""Remote checkpoints are copied once per node into the cache, atomically, and reused while unchanged."""

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


def test_copied_once_then_reused_until_the_remote_changes(remote_model, tmp_path):
    first = cache_checkpoint(remote_model, cache_dir=tmp_path)
    assert (first / "config.json").read_bytes() == b'{"model_type": "internvl"}'
    assert (first / "sub" / "extra.json").exists()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = cache_checkpoint(remote_model, cache_dir=tmp_path)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp  # unchanged: not copied
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folders left behind
    assert resolve_checkpoint(remote_model, cache_dir=tmp_path) == str(first)
    # Re-uploaded (same size, new object): the fresh copy is used, not the stale one. This test asserted the stale
    # copy until the cache was keyed by the remote objects' versions.
    fsspec.filesystem("memory").pipe("/models/tiny/model.safetensors", b"changed")
    fresh = cache_checkpoint(remote_model, cache_dir=tmp_path)
    assert fresh != first and (fresh / "model.safetensors").read_bytes() == b"changed"
    assert resolve_checkpoint(remote_model, cache_dir=tmp_path) == str(fresh)
    fsspec.filesystem("memory").pipe("/models/tiny/sub/new.json", b"{}")  # a file added
    assert cache_checkpoint(remote_model, cache_dir=tmp_path) not in (first, fresh)


def test_remote_without_config_fails_fast(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        check_checkpoint("memory://models/none")
    with pytest.raises(ModelLoadError, match="no config.json"):
        cache_checkpoint("memory://models/none", cache_dir=tmp_path)


def test_hub_ids_pass_through():
    assert resolve_checkpoint("OpenGVLab/InternVL3-1B-hf") == "OpenGVLab/InternVL3-1B-hf"
