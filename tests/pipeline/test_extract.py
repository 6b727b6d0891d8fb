"""Token extraction (`megadual extract`): one output per input sample, codes that decode to the
tokenizer's own reconstruction, byte-identical resume after SIGKILL, corrupt inputs listed,
and a 2-rank run equal to a 1-rank one.

Legend: B batch, T visual positions (8x8 in the debug tokenizer), R residual depth.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch

from megadual.config import load_config
from megadual.data.images import preprocess
from megadual.data.synthetic_images import write_synthetic_shards
from megadual.data.text_tokenizers import BytesTextTokenizer
from megadual.data.token_shards import decode_sample, read_manifest
from megadual.models.vision.tokenizer import DualTokenizer
from megadual.pipeline import extract as extract_mod
from megadual.pipeline.extract import ExtractOptions, directory_sha256, extract_tokens
from tests._dist import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEBUG_CONFIG = os.path.join(REPO, "configs", "debug", "tokenizer.yaml")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    cfg = load_config(DEBUG_CONFIG)
    directory = str(tmp_path_factory.mktemp("tok"))
    DualTokenizer(cfg.tokenizer, seed=0).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory) -> str:
    """36 synthetic images at 40 px (resized to the tokenizer's 32) in 3 shards of 12."""
    directory = str(tmp_path_factory.mktemp("raw"))
    write_synthetic_shards(directory, num=36, size=40, seed=3, shard_size=12)
    return directory


def _opts(raw, out, tok, **kw) -> ExtractOptions:
    return ExtractOptions(inputs=[raw], out=out, tokenizer=tok, batch_size=kw.pop("batch_size", 5),
                          num_workers=kw.pop("num_workers", 0), show_progress=False, **kw)


def _read_all(out: str) -> dict[str, object]:
    """source_key -> TokenSample over every shard the manifest lists."""
    manifest = read_manifest(out)
    samples = {}
    for entry in manifest.shards:
        with tarfile.open(os.path.join(out, entry.name)) as tf:
            groups: dict[str, dict[str, bytes]] = {}
            for m in tf:
                key, _, field = m.name.partition(".")
                groups.setdefault(key, {})[field] = tf.extractfile(m).read()
        assert len(groups) == entry.num_samples
        for key, files in groups.items():
            s = decode_sample(files, entry.name, key, manifest)
            assert s.source_key not in samples, f"{s.source_key} extracted twice"
            samples[s.source_key] = s
    return samples


def _tar_bytes(out: str) -> dict[str, bytes]:
    files = sorted(f for f in os.listdir(out) if f.endswith(".tar") or f == "manifest.json")
    return {f: open(os.path.join(out, f), "rb").read() for f in files}


def _raw_samples(raw: str) -> dict[str, tuple[bytes, str]]:
    """source_key -> (png bytes, caption) read straight from the input tars."""
    out = {}
    for name in sorted(os.listdir(raw)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(raw, name)) as tf:
                files = {m.name: tf.extractfile(m).read() for m in tf}
            for member, data in files.items():
                if member.endswith(".png"):
                    key = member[: -len(".png")]
                    out[f"{name}:{key}"] = (data, files[key + ".txt"].decode())
    return out


def test_every_sample_once_and_codes_decode_to_reconstruction(tmp_path, tokenizer_dir, raw_dir):
    out = str(tmp_path / "tok")
    manifest = extract_tokens(_opts(raw_dir, out, tokenizer_dir, num_workers=1))
    raw = _raw_samples(raw_dir)
    got = _read_all(out)
    assert sorted(got) == sorted(raw) and manifest.num_samples == len(raw) == 36
    assert manifest.skipped == [] and manifest.tokenizer_checkpoint_sha256 == directory_sha256(tokenizer_dir)
    assert manifest.text_tokenizer == "bytes" and (manifest.num_positions, manifest.depth) == (64, 2)

    tok = DualTokenizer.from_pretrained(tokenizer_dir)
    keys = sorted(raw)
    from PIL import Image

    images = torch.stack([preprocess(Image.open(io.BytesIO(raw[k][0])), tok.image_size) for k in keys])
    pixel, semantic = tok.encode(images)  # [B, T, R]
    stored_pixel = torch.from_numpy(np.stack([got[k].pixel_codes for k in keys]).astype(np.int64))
    stored_semantic = torch.from_numpy(np.stack([got[k].semantic_codes for k in keys]).astype(np.int64))
    assert torch.equal(stored_pixel, pixel) and torch.equal(stored_semantic, semantic)
    # decode(stored codes) is the tokenizer's own reconstruction decode(encode(x)). Same codes,
    # other batch composition: allow float reassociation in the batched convs.
    torch.testing.assert_close(tok.decode(stored_pixel), tok.decode(pixel), rtol=0, atol=1e-5)
    text = BytesTextTokenizer()
    for k in keys:
        assert got[k].caption == raw[k][1] and got[k].text_ids.tolist() == text.encode(raw[k][1])
        assert got[k].image_size == (40, 40)


def _write_tar(path: str, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_corrupt_inputs_are_skipped_and_listed(tmp_path, tokenizer_dir, raw_dir):
    raw = tmp_path / "raw"
    raw.mkdir()
    good = open(os.path.join(raw_dir, "shapes-000000.tar"), "rb").read()
    (raw / "a-good.tar").write_bytes(good)
    png = _raw_samples(raw_dir)["shapes-000000.tar:00000000"][0]
    _write_tar(str(raw / "b-mixed.tar"), {"ok.png": png, "ok.txt": b"fine", "bad.png": b"not a png at all",
                                          "bad.txt": b"broken", "cut.png": png[: len(png) // 2], "cut.txt": b"half"})
    (raw / "c-garbage.tar").write_bytes(b"\x00garbage" * 100)
    out = str(tmp_path / "tok")
    manifest = extract_tokens(_opts(str(raw), out, tokenizer_dir))
    got = _read_all(out)
    assert manifest.num_samples == 13 and "b-mixed.tar:ok" in got
    listed = {(s["source"], s.get("key")) for s in manifest.skipped}
    assert listed == {("b-mixed.tar", "b-mixed.tar:bad"), ("b-mixed.tar", "b-mixed.tar:cut"), ("c-garbage.tar", None)}
    assert all(s["reason"] for s in manifest.skipped)
    # on_corrupt="raise" stops at the first unusable input in input order (shards are indexed as
    # they are extracted): a bad sample, or a whole unreadable shard.
    with pytest.raises(ValueError, match="unusable input b-mixed.tar, sample 'b-mixed.tar:bad'.*on-corrupt skip"):
        extract_tokens(_opts(str(raw), str(tmp_path / "strict"), tokenizer_dir, on_corrupt="raise"))
    os.unlink(raw / "b-mixed.tar")
    with pytest.raises(ValueError, match="unusable input c-garbage.tar: .*not a readable tar.*on-corrupt skip"):
        extract_tokens(_opts(str(raw), str(tmp_path / "strict2"), tokenizer_dir, on_corrupt="raise"))


def test_samples_without_image_or_caption_are_skipped_and_listed(tmp_path, tokenizer_dir, raw_dir):
    png = _raw_samples(raw_dir)["shapes-000000.tar:00000000"][0]
    tars = tmp_path / "tars"
    tars.mkdir()
    _write_tar(str(tars / "a.tar"), {"ok.png": png, "ok.txt": b"a red square", "textonly.txt": b"a caption, no image",
                                     "imageonly.png": png, "other.cls": b"3", "blank.png": png, "blank.txt": b" \n"})
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for name, data in {"a.png": png, "a.txt": b"a square", "b.png": png, "c.txt": b"orphan caption",
                       "sub/d.png": png, "sub/d.txt": b"nested", "sub/e.txt": b"another orphan"}.items():
        (folder / name).write_bytes(data)

    manifest = extract_tokens(_opts(str(tars), str(tmp_path / "out-tar"), tokenizer_dir))
    assert sorted(_read_all(str(tmp_path / "out-tar"))) == ["a.tar:ok"]
    reasons = {s["key"]: s["reason"] for s in manifest.skipped}
    assert sorted(reasons) == ["a.tar:blank", "a.tar:imageonly", "a.tar:other", "a.tar:textonly"]
    assert reasons["a.tar:textonly"].startswith("no image:") and reasons["a.tar:imageonly"].startswith("no caption:")
    assert reasons["a.tar:other"].startswith("no image and no caption") and "empty caption" in reasons["a.tar:blank"]
    assert all(s["source"] == "a.tar" for s in manifest.skipped)

    # Folders: an image without NAME.txt, and NAME.txt files without an image, in any chunk.
    out = str(tmp_path / "out-folder")
    manifest = extract_tokens(_opts(str(folder), out, tokenizer_dir, folder_shard_size=2))
    assert sorted(_read_all(out)) == ["a.png", os.path.join("sub", "d.png")]
    reasons = {s["key"]: s["reason"] for s in manifest.skipped}
    assert sorted(reasons) == ["b.png", "c.txt", os.path.join("sub", "e.txt")]
    assert reasons["b.png"].startswith("no caption:") and reasons["c.txt"].startswith("no image:")
    assert manifest.num_samples == 2

    with pytest.raises(ValueError, match="unusable input a.tar, sample 'a.tar:textonly': no image"):
        extract_tokens(_opts(str(tars), str(tmp_path / "strict"), tokenizer_dir, on_corrupt="raise"))


def test_sigkill_and_rerun_gives_identical_shards(tmp_path, tokenizer_dir):
    raw = str(tmp_path / "raw")
    write_synthetic_shards(raw, num=160, size=32, seed=5, shard_size=16)  # 10 input shards
    reference = str(tmp_path / "ref")
    extract_tokens(_opts(raw, reference, tokenizer_dir, batch_size=1))

    out = str(tmp_path / "killed")
    cmd = [sys.executable, os.path.join(REPO, "tools", "extract_tokens.py"), "--input", raw, "--out", out,
           "--tokenizer", tokenizer_dir, "--batch-size", "1", "--num-workers", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = os.path.join(out, ".parts", "tokens-000000.json")
    deadline = time.monotonic() + 60
    while not os.path.exists(first) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    done = sorted(os.listdir(os.path.join(out, ".parts")))
    assert 1 <= len([d for d in done if d.endswith(".json")]) < 10 and not os.path.exists(os.path.join(out, "manifest.json"))

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _tar_bytes(out) == _tar_bytes(reference)
    assert not [f for f in os.listdir(out) if ".tmp-" in f]


def _two_rank_body(rank, world_size, raw, out, tok):
    torch.set_num_threads(1)
    finished = []
    original = extract_mod._finish_shard

    def spy(out_dir, i, *args):
        finished.append(i)
        return original(out_dir, i, *args)

    extract_mod._finish_shard = spy  # this forked rank only
    manifest = extract_tokens(_opts(raw, out, tok))
    return finished, manifest is not None


def test_two_ranks_split_shards_and_match_one_rank(tmp_path, tokenizer_dir, raw_dir):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    extract_tokens(_opts(raw_dir, one, tokenizer_dir))
    results = run_distributed(_two_rank_body, world_size=2, timeout=90, args=(raw_dir, two, tokenizer_dir))
    assert results == [([0, 2], True), ([1], False)]  # shard i belongs to rank i % 2; rank 0 writes the manifest
    assert _tar_bytes(two) == _tar_bytes(one)


def test_decode_workers_split_shards_and_change_no_byte(tmp_path, tokenizer_dir, raw_dir):
    # Worker w of 2 indexes and decodes shards w, w + 2; their batches interleave on arrival.
    one, two = str(tmp_path / "zero-workers"), str(tmp_path / "two-workers")
    extract_tokens(_opts(raw_dir, one, tokenizer_dir, batch_size=5, num_workers=0))
    timings = {}
    extract_tokens(_opts(raw_dir, two, tokenizer_dir, batch_size=5, num_workers=2), timings)
    assert _tar_bytes(two) == _tar_bytes(one) and len(_tar_bytes(one)) == 4  # 3 shards + manifest
    assert timings["images"] == 36 and timings["steady_images"] == 31  # all but the first batch of 5
    assert 0 < timings["steady_s"] < timings["total_s"] and timings["setup_s"] > 0


def test_rerun_restores_missing_manifest_and_rejects_other_tokenizer(tmp_path, tokenizer_dir, raw_dir):
    out = str(tmp_path / "tok")
    extract_tokens(_opts(raw_dir, out, tokenizer_dir))
    before = _tar_bytes(out)
    os.unlink(os.path.join(out, "manifest.json"))
    extract_tokens(_opts(raw_dir, out, tokenizer_dir))
    assert _tar_bytes(out) == before
    other = str(tmp_path / "other-tok")
    cfg = load_config(DEBUG_CONFIG)
    DualTokenizer(cfg.tokenizer, seed=1).save_pretrained(other)
    with pytest.raises(ValueError, match="tokenizer_checkpoint_sha256.*new --out"):
        extract_tokens(_opts(raw_dir, out, other))


def test_cut_and_garbled_tars_list_every_lost_range(tmp_path, tokenizer_dir, raw_dir):
    """Before: a tar cut at or inside a header, or with a garbled header block, lost every sample
    from there on with rc 0 and nothing in `skipped`."""
    good = open(os.path.join(raw_dir, "shapes-000000.tar"), "rb").read()
    with tarfile.open(os.path.join(raw_dir, "shapes-000000.tar")) as tf:
        headers = [m.offset for m in tf]
    members_per_sample = len(headers) // 12
    victim = headers[4 * members_per_sample]  # the first header of sample 4 (of 12)
    garbled = bytearray(good)
    garbled[victim:victim + 512] = b"\xab" * 512
    variants = {"cut-at-header.tar": good[:victim], "cut-in-header.tar": good[:victim + 100],
                "garbled.tar": bytes(garbled)}
    for name, data in variants.items():
        raw = tmp_path / name.removesuffix(".tar")
        raw.mkdir()
        (raw / name).write_bytes(data)
        manifests = []
        for run in ("a", "b"):
            out = str(tmp_path / f"{name}-{run}")
            manifest = extract_tokens(_opts(str(raw), out, tokenizer_dir))
            manifests.append(open(os.path.join(out, "manifest.json"), "rb").read())
        lost = [s for s in manifest.skipped if ":bytes " in s["key"]]
        assert len(lost) == 1 and lost[0]["key"].startswith(f"{name}:bytes {victim}-"), (name, manifest.skipped)
        assert "lost" in lost[0]["reason"]
        if name == "garbled.tar":  # resumes at the next header: only sample 4 is lost (one member gone)
            next_header = headers[4 * members_per_sample + 1]
            assert manifest.num_samples == 11 and lost[0]["key"] == f"{name}:bytes {victim}-{next_header}"
        else:
            assert manifest.num_samples == 4
        assert manifests[0] == manifests[1], name  # reasons are reproducible, byte for byte
        with pytest.raises(ValueError, match=rf"unusable input {name}, sample '{name}:bytes {victim}-"):
            extract_tokens(_opts(str(raw), str(tmp_path / f"{name}-strict"), tokenizer_dir, on_corrupt="raise"))


def test_undecodable_image_reasons_hold_no_memory_address(tmp_path, tokenizer_dir, raw_dir):
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_tar(str(raw / "a.tar"), {"bad.png": b"not a png at all", "bad.txt": b"broken"})
    (reason,) = [s["reason"] for s in extract_tokens(_opts(str(raw), str(tmp_path / "out"), tokenizer_dir)).skipped]
    assert "UnidentifiedImageError" in reason and " at 0x" not in reason


def _children(pid: int) -> set[int]:
    """Pids whose parent is `pid` (from /proc)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the parenthesised name
                out.add(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_killed_extraction_leaves_no_decode_worker_behind(tmp_path, tokenizer_dir):
    """Before: kill -9 of `extract --num-workers 2` left both workers alive for minutes."""
    raw = str(tmp_path / "raw")
    write_synthetic_shards(raw, num=2000, size=32, seed=5, shard_size=100)
    # Batches of 16 fill the workers' result pipes: a worker whose parent is gone then blocks for
    # good in its queue's flush at exit (PyTorch's own parent check does not end it).
    cmd = [sys.executable, os.path.join(REPO, "tools", "extract_tokens.py"), "--input", raw, "--out",
           str(tmp_path / "out"), "--tokenizer", tokenizer_dir, "--batch-size", "16", "--num-workers", "2",
           "--no-progress"]
    # Its own session, killed alone (not its group): the workers must go because their parent did.
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = os.path.join(str(tmp_path / "out"), ".parts", "tokens-000000.json")
    deadline = time.monotonic() + 60
    while not os.path.exists(first) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = _children(proc.pid)
    assert len(workers) >= 2 and proc.poll() is None, "no decode workers to test"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, workers)), f"workers {sorted(filter(_alive, workers))} outlived their parent"
