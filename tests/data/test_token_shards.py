"""Token shard schema: round trip, atomic writes, manifest, webdataset compatibility, bad shards.

Legend: T visual positions, R residual depth.
"""

import io
import json
import os
import tarfile

import numpy as np
import pytest

from megadual.data.shard_reader import ShardCursor
from megadual.data.shard_writer import TarBuilder, TokenShardWriter, tar_bytes, write_shard
from megadual.data.token_shards import (
    SCHEMA_VERSION,
    Manifest,
    TokenShardError,
    decode_sample,
    encode_sample,
    read_manifest,
)

from .token_fixtures import CODEBOOK, DEPTH, NUM_POSITIONS, random_sample, template, write_dataset


def _read_all(path, manifest, n):
    cursor = ShardCursor(path, path, n)
    out = []
    for pos, key, got in cursor.read(list(range(n))):
        out.append(got if isinstance(got, TokenShardError) else decode_sample(got, path, key, manifest))
    return out


def test_round_trip_and_manifest(tmp_path):
    samples = write_dataset(str(tmp_path), num_samples=7, per_shard=3)
    manifest = read_manifest(str(tmp_path))
    assert [s.name for s in manifest.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s.num_samples for s in manifest.shards] == [3, 3, 1]
    assert manifest.num_samples == 7 and manifest.schema_version == SCHEMA_VERSION
    assert (manifest.num_positions, manifest.depth, manifest.pixel_codebook_size) == (NUM_POSITIONS, DEPTH, CODEBOOK)
    got = []
    for entry in manifest.shards:
        got += _read_all(str(tmp_path / entry.name), manifest, entry.num_samples)
    for want, have in zip(samples, got, strict=True):
        assert have.key == want.key and have.caption == want.caption
        assert have.pixel_codes.dtype == np.uint16 and have.pixel_codes.shape == (NUM_POSITIONS, DEPTH)
        np.testing.assert_array_equal(have.pixel_codes, want.pixel_codes)
        np.testing.assert_array_equal(have.semantic_codes, want.semantic_codes)
        np.testing.assert_array_equal(have.text_ids, want.text_ids)
        assert have.image_size == (24, 32) and have.source_key == f"raw/{want.key}"


def test_shards_are_byte_identical_across_runs(tmp_path):
    write_dataset(str(tmp_path / "a"), num_samples=5, per_shard=5)
    write_dataset(str(tmp_path / "b"), num_samples=5, per_shard=5)
    for name in ("shard-000000.tar", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    good = [random_sample(rng, "a"), random_sample(rng, "b")]
    path = str(tmp_path / "x.tar")
    write_shard(path, good)
    before = open(path, "rb").read()
    bad = good + [random_sample(rng, "bad.key")]  # the dot makes encoding fail midway
    with pytest.raises(ValueError, match="bad.key"):
        write_shard(path, bad)
    # The finished shard is untouched and no temporary file is left behind.
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["x.tar"]

    # A crash while the bytes go to disk: the final name must never appear.
    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr("megadual.data.shard_writer.os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        write_shard(str(tmp_path / "y.tar"), good)
    assert sorted(os.listdir(tmp_path)) == ["x.tar"]


def test_writer_records_skipped_inputs_and_rejects_wrong_shapes(tmp_path):
    writer = TokenShardWriter(str(tmp_path), template(), samples_per_shard=4)
    writer.skip(source="raw-0001.tar", key="img_3", reason="cannot decode image")
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match=r"pixel_codes has shape \(5, 2\)"):
        writer.add(random_sample(rng, "z", num_positions=5))
    writer.add(random_sample(rng, "ok"))
    manifest = writer.close()
    assert read_manifest(str(tmp_path)).skipped == [{"source": "raw-0001.tar", "key": "img_3", "reason": "cannot decode image"}]
    assert manifest.num_samples == 1


def test_webdataset_reads_the_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    samples = write_dataset(str(tmp_path), num_samples=4, per_shard=2)
    urls = [str(tmp_path / "shard-000000.tar"), str(tmp_path / "shard-000001.tar")]
    # shardshuffle and the node splitter set explicitly (the defaults warn / refuse under WORLD_SIZE>1).
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False).decode()
    got = list(ds)
    assert [g["__key__"] for g in got] == [s.key for s in samples]
    for g, s in zip(got, samples):
        np.testing.assert_array_equal(g["pixel_codes.npy"], s.pixel_codes)
        np.testing.assert_array_equal(g["text_ids.npy"], s.text_ids)
        assert g["json"]["schema_version"] == SCHEMA_VERSION and g["txt"] == s.caption


# ----------------------------------------------------------------------------- bad inputs


def _files(key="k0", seed=0, **overrides):
    files = encode_sample(random_sample(np.random.default_rng(seed), key))
    files.update(overrides)
    return files


def test_missing_field_is_named():
    files = _files()
    del files["pixel_codes.npy"]
    with pytest.raises(TokenShardError, match=r"token shard s\.tar, sample 'k0': missing field\(s\) \['pixel_codes.npy'\]"):
        decode_sample(files, "s.tar", "k0", template())


def test_code_out_of_range_is_named():
    sample = random_sample(np.random.default_rng(0), "k0")
    sample.semantic_codes[2, 1] = CODEBOOK  # one past the last code
    with pytest.raises(TokenShardError, match=f"sample 'k0': semantic_codes.npy holds code {CODEBOOK}, outside the codebook of {CODEBOOK}"):
        decode_sample(encode_sample(sample), "s.tar", "k0", template())


def test_wrong_schema_version_per_sample_and_in_manifest(tmp_path):
    meta = json.dumps({"schema_version": 99, "image_size": [1, 1], "source_key": "x"}).encode()
    with pytest.raises(TokenShardError, match="schema_version is 99, this reader understands 1"):
        decode_sample(_files(json=meta), "s.tar", "k0", template())
    data = json.loads(template().to_json())
    data["schema_version"] = 0
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(TokenShardError, match="manifest schema_version is 0"):
        read_manifest(str(tmp_path))
    os.unlink(tmp_path / "manifest.json")
    with pytest.raises(TokenShardError, match="no manifest.json"):
        read_manifest(str(tmp_path))


def test_wrong_code_shape_is_named():
    with pytest.raises(TokenShardError, match=r"pixel_codes.npy is uint16 \(6, 2\), the manifest says uint16 \(7, 2\)"):
        decode_sample(_files(), "s.tar", "k0", Manifest(**{**template().__dict__, "num_positions": 7}))


def _member_offset(path, name):
    with tarfile.open(path) as tf:
        return tf.getmember(name).offset_data


@pytest.mark.parametrize("where", ["inside_data", "inside_header", "end_marker"])
def test_truncated_tar_is_detected(tmp_path, where):
    samples = write_dataset(str(tmp_path), num_samples=4, per_shard=4)
    path = str(tmp_path / "shard-000000.tar")
    data = open(path, "rb").read()
    if where == "inside_data":
        cut, first_lost = _member_offset(path, f"{samples[2].key}.pixel_codes.npy") + 10, 2
    elif where == "inside_header":
        cut, first_lost = _member_offset(path, f"{samples[2].key}.json") - 512 + 100, 2
    else:  # every member complete, only the end-of-archive blocks cut off
        with tarfile.open(path) as tf:
            last = tf.getmembers()[-1]
        cut, first_lost = last.offset_data + last.size + 100, 3
    open(path, "wb").write(data[:cut])
    manifest = read_manifest(str(tmp_path))
    got = _read_all(path, manifest, 4)
    assert [isinstance(g, TokenShardError) for g in got] == [i >= first_lost for i in range(4)]
    err = got[-1]
    assert "shard-000000.tar" in str(err) and "truncated or damaged tar" in str(err)
    # Skipping over the damage without reading it finds the same thing.
    cursor = ShardCursor(path, path, 4)
    assert isinstance(next(iter(cursor.read([3])))[2], TokenShardError)


def test_cursor_skips_and_rewinds(tmp_path):
    samples = write_dataset(str(tmp_path), num_samples=6, per_shard=6)
    path = str(tmp_path / "shard-000000.tar")
    cursor = ShardCursor(path, path, 6)
    assert [k for _, k, _ in cursor.read([1, 4])] == [samples[1].key, samples[4].key]
    assert [k for _, k, _ in cursor.read([5])] == [samples[5].key]
    assert [k for _, k, _ in cursor.read([0, 2])] == [samples[0].key, samples[2].key]  # reopens to go back


def test_npy_bytes_are_np_save_bytes_with_cached_headers():
    from megadual.data.token_shards import _npy_bytes

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 9, (7, 2)).astype(np.uint16), np.zeros(0, np.int32),
              rng.integers(0, 9, 5).astype(np.int32), rng.integers(0, 9, (4, 6)).astype(np.uint16)[:, ::2]]
    for array in arrays + arrays:  # the second pass reuses the cached headers
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        assert _npy_bytes(array) == buf.getvalue()


def _tarfile_reference(members: list[tuple[str, bytes]]) -> bytes:
    """The same members written by the standard library's tarfile (the oracle)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(payload), 0, 0o444, 0, 0, "", ""
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.mark.parametrize("members", [
    [],
    [("a.txt", b"")],
    [("a.txt", b"x" * 512), ("a.json", b"{}"), ("b.npy", bytes(range(256)) * 41)],
    [("k" * 96 + ".txt", b"100 chars exactly"), ("k" * 97 + ".txt", b"101: a pax record")],
    [("caf\u00e9.txt", "non-ASCII name: a pax record".encode())],
    [(f"s{i:05d}.{f}", b"y" * (37 * i % 1300)) for i in range(40) for f in ("txt", "json")],
])
def test_tar_builder_writes_the_bytes_tarfile_writes(members):
    tar = TarBuilder()
    for name, payload in members:
        tar.add(name, payload)
    assert tar.getvalue() == _tarfile_reference(members)


def test_tar_bytes_keeps_a_sample_together():
    data = tar_bytes([("a", {"txt": b"1", "json": b"{}"}), ("b", {"txt": b"2"})])
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.getnames() == ["a.json", "a.txt", "b.txt"]
        assert {m.mtime for m in tf.getmembers()} == {0}


def test_a_missing_or_non_directory_path_is_named_as_such(tmp_path):
    with pytest.raises(TokenShardError, match=r"token shard .*nowhere: does not exist; point the loader"):
        read_manifest(str(tmp_path / "nowhere"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(TokenShardError, match=r"file: is not a directory"):
        read_manifest(str(tmp_path / "file"))
    with pytest.raises(TokenShardError, match=r"no manifest.json in the directory"):
        read_manifest(str(tmp_path))
