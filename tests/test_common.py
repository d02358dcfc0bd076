"""Shared helpers: atomic writes (permissions, no partial file), PREFIX,EPOCH parsing, --ctx parsing."""
import os

import pytest

from recognition.common import ToolkitError, atomic_write, parse_ctx, parse_prefix_epoch, save_params_atomic


def test_atomic_files_get_the_permissions_open_would_give(tmp_path):
    import mxnet as mx

    umask = os.umask(0o022)
    try:
        with atomic_write(str(tmp_path / "a.txt"), "w") as f:
            f.write("x")
        save_params_atomic(str(tmp_path / "b.params"), {"arg:w": mx.nd.ones(3)})
    finally:
        os.umask(umask)
    for name in ("a.txt", "b.params"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.params"]  # no temporary file left


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "keep.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(str(path), "w") as f:
            f.write("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_prefix_epoch_forms_and_errors(tmp_path):
    prefix = str(tmp_path / "model")
    open(prefix + "-0003.params", "wb").close()
    assert parse_prefix_epoch(prefix + ",3") == (prefix, 3)
    assert parse_prefix_epoch(prefix + "-0003.params") == (prefix, 3)
    with pytest.raises(ToolkitError, match="missing ',EPOCH'"):
        parse_prefix_epoch(prefix)
    with pytest.raises(ToolkitError, match="is not an integer"):
        parse_prefix_epoch(prefix + ",x")
    with pytest.raises(ToolkitError, match=r"model-0001.params does not exist \(found: model-0003.params\)"):
        parse_prefix_epoch(prefix + ",1")


def test_ctx_parsing():
    import mxnet as mx

    assert parse_ctx("cpu:0,cpu:1") == [mx.cpu(0), mx.cpu(1)]
    with pytest.raises(ToolkitError, match="cannot parse 'tpu:0'"):
        parse_ctx("tpu:0")
    if mx.context.num_gpus() == 0:
        with pytest.raises(ToolkitError, match="gpu:0 requested but 0 GPU"):
            parse_ctx("gpu:0")
