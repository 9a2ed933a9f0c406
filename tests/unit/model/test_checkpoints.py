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


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """A file-based Hugging Face hub cache (models--org--name/snapshots/<commit>, refs/main) in offline mode; any
    connection off the loopback fails the test, so nothing can reach a real hub."""
    import socket

    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    real_connect = socket.socket.connect

    def loopback_only(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("::1", "localhost")) and "/" not in host:
            raise AssertionError(f"a test tried to connect to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)

    def publish(repo_id: str, build) -> None:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        build(repo / "snapshots" / COMMIT)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(COMMIT)

    return publish


def test_original_format_hub_id_is_fetched_then_converted(offline_hub, tmp_path):
    """The README: original-format checkpoints are converted on load, by hub id too (not only folders and s3://)."""
    from pipeline.model.checkpoints import prepare_checkpoint
    from pipeline.model.transformers_engine import InternVLEngine
    from tests.unit.model.test_convert import original_config, original_state, write_original, write_original_tokenizer

    tokenizers = write_original_tokenizer(tmp_path / "tokenizer")
    config = original_config("qwen2", "300m", tokenizers, image_size=448)
    offline_hub("OpenGVLab/InternVL-test", lambda folder: write_original(folder, config, original_state(config), tokenizers))
    native = prepare_checkpoint("OpenGVLab/InternVL-test", cache_dir=tmp_path / "cache")
    assert native.startswith(str(tmp_path / "cache" / "converted-"))
    assert prepare_checkpoint("OpenGVLab/InternVL-test", cache_dir=tmp_path / "cache", revision=COMMIT) == native
    engine = InternVLEngine.load("OpenGVLab/InternVL-test", device="cpu", cache_dir=tmp_path / "cache")
    assert engine.model.config.model_type == "internvl"


def test_native_hub_id_loads_from_its_snapshot_and_a_missing_one_is_named(offline_hub, tiny_model, tmp_path):
    import shutil

    from pipeline.model.checkpoints import prepare_checkpoint

    offline_hub("org/tiny-hf", lambda folder: shutil.copytree(tiny_model, folder))
    path = prepare_checkpoint("org/tiny-hf", cache_dir=tmp_path / "cache")
    assert path.endswith(f"snapshots/{COMMIT}") and not (tmp_path / "cache").exists()  # native: used as it is
    with pytest.raises(ModelLoadError, match="'org/absent'.*hub snapshot could not be had"):
        prepare_checkpoint("org/absent", cache_dir=tmp_path / "cache")
