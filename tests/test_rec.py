"""recognition.rec: byte format checked against mxnet's own recordio reader, atomic writes, safe .bin loading."""
import os
import pickle

import mxnet as mx
import numpy as np
import pytest

from recognition.common import ToolkitError
from recognition.rec import (
    RecordReader,
    RecordWriter,
    read_property,
    safe_load_bin_pickle,
    save_bin,
    write_dataset,
    write_property,
)


def _samples(n_classes=4, per=3, seed=0):
    rng = np.random.RandomState(seed)
    return [(c, rng.bytes(int(rng.randint(5, 40)))) for c in range(n_classes) for _ in range(per)]


def test_identity_layout_matches_mxnet_reader(tmp_path):
    samples = _samples()
    rng = np.random.RandomState(1)
    shuffled = [samples[i] for i in rng.permutation(len(samples))]
    info = write_dataset(str(tmp_path), shuffled, num_classes=5)  # class 4 has no images
    assert read_property(str(tmp_path)) == (5, 112, 112)
    n = len(samples)
    ref = mx.recordio.MXIndexedRecordIO(info["idx"], info["rec"], "r")
    h0, payload0 = mx.recordio.unpack(ref.read_idx(0))
    assert h0.flag > 0 and list(h0.label) == [n + 1, n + 1 + 5] and payload0 == b""
    got = []
    for c in range(5):
        h, _ = mx.recordio.unpack(ref.read_idx(n + 1 + c))
        a, b = int(h.label[0]), int(h.label[1])
        for k in range(a, b):
            hk, data = mx.recordio.unpack(ref.read_idx(k))
            assert hk.label == c
            got.append((c, data))
    ref.close()
    assert got == sorted(shuffled, key=lambda s: s[0])  # grouped by class, input order kept within a class
    reader = RecordReader(info["rec"])
    assert reader.has_identity_records and reader.identities[4][0] == reader.identities[4][1]
    assert [reader.read(k) for k in reader.image_keys] == [(float(c), d) for c, d in got]
    np.testing.assert_array_equal(reader.labels(), [c for c, _ in got])


def test_no_identity_records_shuffled(tmp_path):
    samples = _samples()
    info = write_dataset(str(tmp_path), samples, identity_records=False, shuffle=True, seed=3)
    reader = RecordReader(info["rec"])
    assert not reader.has_identity_records and reader.image_keys == list(range(len(samples)))
    read = [reader.read(k) for k in reader.image_keys]
    assert sorted(read) == sorted((float(c), d) for c, d in samples) and read != [(float(c), d) for c, d in samples]
    ref = mx.recordio.MXIndexedRecordIO(info["idx"], info["rec"], "r")
    for k in (0, 5, len(samples) - 1):
        h, d = mx.recordio.unpack(ref.read_idx(k))
        assert (float(h.label), d) == read[k]


def test_writer_abort_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with RecordWriter(str(tmp_path) + os.sep) as w:
            w.write(0, 1.0, b"abc")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_multi_label_and_array_labels(tmp_path):
    with RecordWriter(str(tmp_path / "x.rec")) as w:
        w.write(0, [3.0, 7.0, 1.0], b"img0")
        w.write(1, 2.0, b"img1")
    r = RecordReader(str(tmp_path / "x.rec"))
    assert not r.has_identity_records  # flag>0 but carries a payload: a multi-label image, not a header
    lab, data = r.read(0)
    np.testing.assert_array_equal(lab, [3, 7, 1])
    np.testing.assert_array_equal(r.labels(), [3.0, 2.0])


def test_idx_disagreeing_with_rec(tmp_path):
    info = write_dataset(str(tmp_path), _samples())
    lines = open(info["idx"]).read().splitlines()
    key, pos = lines[3].split("\t")
    lines[3] = f"{key}\t{int(pos) + 4}"
    open(info["idx"], "w").write("\n".join(lines) + "\n")
    with pytest.raises(ToolkitError, match=r"train\.idx: disagrees with .*train\.rec: key 3"):
        RecordReader(info["rec"])
    lines[3] = f"{key}\t{10 ** 9}"
    open(info["idx"], "w").write("\n".join(lines) + "\n")
    with pytest.raises(ToolkitError, match="past the end"):
        RecordReader(info["rec"])


def test_missing_files_and_bad_property(tmp_path):
    with pytest.raises(ToolkitError, match="property file does not exist"):
        read_property(str(tmp_path))
    (tmp_path / "property").write_text("12;112\n")
    with pytest.raises(ToolkitError, match="cannot parse"):
        read_property(str(tmp_path))
    write_property(str(tmp_path), 7, 96, 112)
    assert read_property(str(tmp_path)) == (7, 96, 112)
    info = write_dataset(str(tmp_path), _samples())
    os.remove(info["idx"])
    with pytest.raises(ToolkitError, match=r"train\.idx: index file does not exist"):
        RecordReader(info["rec"])
    open(info["idx"], "w").close()
    with pytest.raises(ToolkitError, match="empty record file"):
        RecordReader(info["rec"])


def test_safe_bin_roundtrip_and_py2_numpy_forms(tmp_path):
    imgs, same = [b"a" * 5, b"b" * 6, b"c", b"d"], [True, False]
    p = save_bin(str(tmp_path / "v.bin"), imgs, same)
    assert safe_load_bin_pickle(p) == (imgs, same)
    # protocol 2 (as Python 2 wrote it) with numpy-array images, as some converted bins hold
    arrs = [np.frombuffer(b, np.uint8) for b in imgs]
    with open(tmp_path / "n.bin", "wb") as f:
        pickle.dump((arrs, np.array(same)), f, protocol=2)
    assert safe_load_bin_pickle(str(tmp_path / "n.bin")) == (imgs, same)
    for proto in (2, 4):  # bytearray images: a latin-1 str at protocol 2, bytes at 3+
        with open(tmp_path / "ba.bin", "wb") as f:
            pickle.dump(([bytearray(b) for b in imgs], same), f, protocol=proto)
        assert safe_load_bin_pickle(str(tmp_path / "ba.bin")) == (imgs, same)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_safe_bin_refuses_code_and_bad_counts(tmp_path):
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump(([_Evil()], []), f)
    with pytest.raises(ToolkitError, match=r"evil\.bin: refusing to unpickle forbidden global posix\.system"):
        safe_load_bin_pickle(str(tmp_path / "evil.bin"))
    with open(tmp_path / "odd.bin", "wb") as f:
        pickle.dump(([b"a", b"b", b"c"], [True]), f)
    with pytest.raises(ToolkitError, match="3 images for 1 pairs"):
        safe_load_bin_pickle(str(tmp_path / "odd.bin"))
    with pytest.raises(ToolkitError, match="need 2 images per pair"):
        save_bin(str(tmp_path / "x.bin"), [b"a"], [True])
    assert not (tmp_path / "x.bin").exists()


def test_real_lfw_bin_loads(shared_dir):
    path = os.path.join(shared_dir, "lfw_fold1.bin")
    if not os.path.isfile(path):
        pytest.skip("lfw_fold1.bin fixture is absent")
    images, issame = safe_load_bin_pickle(path)
    assert len(images) == 1200 and len(issame) == 600 and sum(issame) == 300
    img = mx.image.imdecode(images[0]).asnumpy()
    assert img.shape == (112, 112, 3)
