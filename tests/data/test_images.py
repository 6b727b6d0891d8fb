"""Image input: shards and folders decode to [-1, 1] squares; corrupt images are skipped and
counted (or fatal); the loader splits ranks disjointly and resumes exactly."""

import io
import logging
import os
import tarfile

import pytest
import torch
from PIL import Image

from megadual.config import ImageDataConfig
from megadual.data.images import (ImageBatchLoader, RecordDataset, TarMember, _plain_tar_members, build_image_dataset,
                                  index_folder, index_shards, preprocess, tar_samples)
from megadual.data.synthetic_images import synthetic_sample, write_synthetic_shards


def _corrupt_shard(path):
    """A shard with one good sample and one PNG that is only a header."""
    good = path + ".png"
    synthetic_sample(0, 0, 32)[0].save(good)
    with tarfile.open(path, "w") as tar:
        tar.add(good, arcname="good.png")
        info = tarfile.TarInfo("bad.png")
        data = b"\x89PNG\r\n\x1a\n" + b"\x00" * 20  # a PNG signature and nothing decodable
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_shards_decode_with_captions(tmp_path):
    write_synthetic_shards(str(tmp_path), num=6, size=40, seed=2, shard_size=4)
    ds = build_image_dataset(ImageDataConfig(source="webdataset", paths=[str(tmp_path)]), image_size=32)
    assert len(ds) == 6
    sample = ds[5]
    assert sample.image.shape == (3, 32, 32) and sample.image.dtype == torch.float32
    assert -1.0 <= float(sample.image.min()) and float(sample.image.max()) <= 1.0
    assert sample.caption == synthetic_sample(2, 5, 40)[1]
    assert sample.key.endswith("shapes-000001.tar:00000005")


def test_folder_with_sidecar_captions_and_center_crop(tmp_path):
    wide = Image.new("RGB", (60, 30), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 15, 30))  # a blue strip on the left: cropped away
    wide.save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a red picture\n")
    Image.new("RGB", (20, 20), (0, 255, 0)).save(tmp_path / "sub.jpg")
    records = index_folder([str(tmp_path)])
    assert [r.key.rsplit("/", 1)[1] for r in records] == ["sub.jpg", "wide.png"]
    ds = RecordDataset(records, 16)
    wide_sample = ds[1]
    assert wide_sample.caption == "a red picture" and ds[0].caption == ""
    assert wide_sample.image.shape == (3, 16, 16)
    # Shorter side to 16 -> 32x16, centre 16 columns: all red.
    torch.testing.assert_close(wide_sample.image[:, :, 4:12], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 16, 8))
    assert preprocess(Image.new("RGB", (16, 16), (255, 255, 255)), 16).min() == 1.0


def test_corrupt_images_are_skipped_counted_and_logged(tmp_path, caplog):
    shard = _corrupt_shard(str(tmp_path / "mixed.tar"))
    ds = RecordDataset(index_shards([shard]), 32)
    loader = ImageBatchLoader(ds, batch_size=2, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="megadual.data.images"):
        batch = next(loader)
    assert batch["images"].shape == (1, 3, 32, 32)  # the batch is short by the corrupt image
    assert [k for k, _ in batch["corrupt"]] == [f"{shard}:bad"] and loader.num_corrupt == 1
    assert f"{shard}:bad" in caplog.text
    fatal = ImageBatchLoader(ds, batch_size=2, shuffle=False, on_corrupt="raise")
    with pytest.raises(ValueError, match=r"corrupt image .*mixed.tar:bad.*images.on_corrupt=skip"):
        next(fatal)
    assert loader.state_dict()["num_corrupt"] == 1


def test_missing_paths_and_empty_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="images.paths"):
        index_shards([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        index_folder([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ImageBatchLoader(list(range(3)), batch_size=2, world_size=2)


def test_ranks_are_disjoint_and_resume_is_exact():
    ds = build_image_dataset(ImageDataConfig(source="synthetic", num_samples=20, seed=1), image_size=16)
    ranks = [ImageBatchLoader(ds, batch_size=2, rank=r, world_size=2, seed=5) for r in range(2)]
    epoch = [[k for _ in range(5) for k in next(loader)["keys"]] for loader in ranks]
    assert not set(epoch[0]) & set(epoch[1]) and len(set(epoch[0]) | set(epoch[1])) == 20
    whole = ImageBatchLoader(ds, batch_size=2, rank=0, world_size=2, seed=5, num_workers=0)
    for _ in range(7):  # into the second epoch
        next(whole)
    state = whole.state_dict()
    expected = [next(whole)["keys"] for _ in range(4)]
    resumed = ImageBatchLoader(ds, batch_size=2, rank=0, world_size=2, seed=5, num_workers=1)
    resumed.load_state_dict(state)
    assert state["taken"] * 2 > 20 and [next(resumed)["keys"] for _ in range(4)] == expected  # in epoch 2


def _tarfile_members(path):
    with tarfile.open(path, "r:") as tar:
        return [TarMember(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def _tar(path, members, fmt=tarfile.PAX_FORMAT, directory=None):
    with tarfile.open(path, "w", format=fmt) as tar:
        if directory:
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_tar_samples_reads_what_tarfile_reads(tmp_path):
    files = [("a.png", b"x" * 700), ("a.txt", b"cap"), ("b.png", b""), ("b.txt", b"y" * 512)]
    plain = {
        "synthetic": write_synthetic_shards(str(tmp_path / "synth"), num=5, size=16, shard_size=5)[0],
        "ustar": _tar(str(tmp_path / "u.tar"), files, tarfile.USTAR_FORMAT),
        "directory": _tar(str(tmp_path / "d.tar"), [("dir/" + n, d) for n, d in files], directory="dir"),
        "prefix": _tar(str(tmp_path / "p.tar"), [("p" * 90 + "/" + "q" * 60 + ".txt", b"long path")],
                       tarfile.USTAR_FORMAT),
    }
    other = {  # read by tarfile: a pax record, GNU headers
        "pax": _tar(str(tmp_path / "x.tar"), [("n" * 120 + ".txt", b"needs a pax record")] + files),
        "gnu": _tar(str(tmp_path / "g.tar"), files, tarfile.GNU_FORMAT),
    }
    for name, path in {**plain, **other}.items():
        expected = _tarfile_members(path)
        with open(path, "rb") as f:
            fast = _plain_tar_members(f, os.path.getsize(path))
        assert (fast is not None) == (name in plain), name  # the fast path runs where it should
        samples, damage = tar_samples(path)
        assert damage == []
        got = [m for _, parts in samples for m in parts.values()]
        assert sorted(got) == sorted(expected) and expected, name
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(plain["ustar"], "rb").read()[:600])  # inside the first member's data
    with open(cut, "rb") as f:
        assert _plain_tar_members(f, 600) is None  # tarfile decides about a cut tar
