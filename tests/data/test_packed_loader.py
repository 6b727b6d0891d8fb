"""The packed loader: determinism, exact resume (with workers), epoch coverage across ranks and
workers, bad-input policies, CFG drop rate, too-long policy, config.

Legend: B rows per batch, T tokens per row.
"""

import json
import tarfile

import numpy as np
import pytest
import torch

from megadual.config import ConfigError, config_from_dict
from megadual.data.packed_loader import PackedMultimodalLoader
from megadual.data.shard_writer import tar_bytes, write_atomic
from megadual.data.token_shards import TokenShardError, encode_sample, read_manifest

from .token_fixtures import CODEBOOK, TOKENS, loader_config, random_sample, write_dataset


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _keys(batch):
    return [m[3] for row in batch["samples"] for m in row]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    write_dataset(str(d), num_samples=90, per_shard=10)  # 9 shards
    return str(d)


def test_same_seed_same_batches_other_seed_differs(data_dir):
    a = _take(PackedMultimodalLoader(loader_config(data_dir), TOKENS), 3)
    b = _take(PackedMultimodalLoader(loader_config(data_dir), TOKENS), 3)
    c = _take(PackedMultimodalLoader(loader_config(data_dir, seed=4), TOKENS), 3)
    for x, y in zip(a, b):
        _same(x, y)
    assert [_keys(x) for x in a] != [_keys(x) for x in c]


@pytest.mark.parametrize("num_workers,k", [(0, 7), (2, 5)])
def test_resume_is_exact(data_dir, num_workers, k):
    cfg = loader_config(data_dir, num_workers=num_workers, batch_size=2, pack_window=8)
    m = 12  # crosses windows and (90 samples / 2 streams) epoch boundaries
    reference = _take(PackedMultimodalLoader(cfg, TOKENS), k + m)
    first = PackedMultimodalLoader(cfg, TOKENS)
    head = _take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    first.close()
    for x, y in zip(head, reference):
        _same(x, y)
    resumed = PackedMultimodalLoader(cfg, TOKENS)
    resumed.load_state_dict(state)
    for x, y in zip(_take(resumed, m), reference[k:]):
        _same(x, y)
    # Counters resume too (the reread window is not counted twice).
    uninterrupted = PackedMultimodalLoader(cfg, TOKENS)
    _take(uninterrupted, k + m)
    assert resumed.stats == uninterrupted.stats


def _epoch_zero_keys(loaders):
    """Read every loader until each of its streams is past epoch 0; epoch-0 sample keys."""
    keys = []
    for loader in loaders:
        while min(s["epoch"] for s in loader.state_dict()["streams"].values()) == 0:
            for row in next(loader)["samples"]:
                keys += [m[3] for m in row if m[0] == 0]
        loader.close()
    return keys


@pytest.mark.parametrize("split", ["shard", "sample"])
def test_two_ranks_two_workers_cover_an_epoch_exactly_once(data_dir, split):
    all_keys = [f"s0x{i:05d}" for i in range(90)]
    loaders = [
        PackedMultimodalLoader(loader_config(data_dir, num_workers=2, split=split), TOKENS, rank=r, world_size=2)
        for r in range(2)
    ]
    keys = _epoch_zero_keys(loaders)
    assert sorted(keys) == all_keys  # none twice, none missing


def test_sample_split_works_with_fewer_shards_than_streams(tmp_path):
    write_dataset(str(tmp_path), num_samples=30, per_shard=15)  # 2 shards, 4 streams
    with pytest.raises(ValueError, match="split='shard' needs at least one shard per stream: 2 shards for 4"):
        next(PackedMultimodalLoader(loader_config(str(tmp_path)), TOKENS, rank=0, world_size=4))
    loaders = [PackedMultimodalLoader(loader_config(str(tmp_path), split="sample"), TOKENS, rank=r, world_size=4)
               for r in range(4)]
    assert sorted(_epoch_zero_keys(loaders)) == [f"s0x{i:05d}" for i in range(30)]


def test_resample_mode_draws_shards_with_replacement(data_dir):
    loader = PackedMultimodalLoader(loader_config(data_dir, mode="resample"), TOKENS)
    shards = set()
    while loader.state_dict()["streams"]["0"]["epoch"] < 3:
        shards |= {m[1] for row in next(loader)["samples"] for m in row}
    assert shards <= {f"0/shard-{i:06d}.tar" for i in range(9)} and len(shards) >= 5


def test_state_from_another_layout_is_refused(data_dir):
    state = PackedMultimodalLoader(loader_config(data_dir), TOKENS, rank=0, world_size=1).state_dict()
    other = PackedMultimodalLoader(loader_config(data_dir, split="sample"), TOKENS, rank=0, world_size=2)
    with pytest.raises(ValueError, match="saved with world_size=1, this loader has world_size=2"):
        other.load_state_dict(state)


# ----------------------------------------------------------------------------- sampling choices


def test_cfg_drop_rate_is_honoured_and_deterministic(tmp_path):
    write_dataset(str(tmp_path), num_samples=400, per_shard=100)

    def epoch_choices(seed):
        cfg = loader_config(str(tmp_path), seed=seed, generation_fraction=1.0, cfg_drop_rate=0.3, pack_window=64)
        loader = PackedMultimodalLoader(cfg, TOKENS)
        choices, seen_dropped, meta_dropped = {}, 0, 0
        while loader.state_dict()["streams"]["0"]["epoch"] == 0:
            batch = next(loader)
            for row in batch["samples"]:
                for m in row:
                    meta_dropped += m[5]
                    if m[0] == 0:
                        choices[m[3]] = m[5]
            # A dropped caption shows in the tokens: the unconditional prompt, the marker, image_start.
            t = batch["input_ids"].shape[1]
            for start in batch["cu_seqlens"][:-1].tolist():
                seen_dropped += batch["input_ids"][start // t, start % t : start % t + 3].tolist() == [47, 45, 41]
        assert seen_dropped == meta_dropped > 0
        return choices

    a, b, c = epoch_choices(1), epoch_choices(1), epoch_choices(2)
    assert len(a) == 400 and a == b
    rate = sum(a.values()) / len(a)
    assert abs(rate - 0.3) < 0.07, rate  # 3 binomial standard deviations at n=400
    assert a != c


def test_task_mix_follows_generation_fraction(data_dir):
    for fraction, want in ((0.0, "understanding"), (1.0, "generation")):
        batch = next(PackedMultimodalLoader(loader_config(data_dir, generation_fraction=fraction), TOKENS))
        assert {m[4] for row in batch["samples"] for m in row} == {want}


def test_too_long_samples_drop_or_raise(tmp_path):
    write_dataset(str(tmp_path), num_samples=40, per_shard=10, min_text=1, max_text=50)
    cfg = loader_config(str(tmp_path), seq_len=40, too_long="drop")
    loader = PackedMultimodalLoader(cfg, TOKENS)
    for _ in range(5):
        batch = next(loader)
        assert batch["input_ids"].shape == (2, 40)
    assert loader.stats["dropped_too_long"] > 0
    with pytest.raises(ValueError, match="more than loader.seq_len=40"):
        _take(PackedMultimodalLoader(loader_config(str(tmp_path), seq_len=40, too_long="raise"), TOKENS), 5)
    with pytest.raises(ValueError, match="cannot hold one image of 6 positions"):
        PackedMultimodalLoader(loader_config(str(tmp_path), seq_len=8), TOKENS)


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture()
def bad_dir(tmp_path):
    """4 shards of 5: shard 1 truncated after 2 samples; shard 2 has one sample missing a
    field, one with a code out of range, one with a wrong schema version."""
    d = str(tmp_path)
    write_dataset(d, num_samples=20, per_shard=5)
    path = f"{d}/shard-000001.tar"
    with open(path, "rb") as f:
        data = f.read()
    with tarfile.open(path) as tf:
        cut = [m for m in tf.getmembers() if m.name.startswith("s0x00007.")][0].offset_data + 20
    with open(path, "wb") as f:
        f.write(data[:cut])
    rng = np.random.default_rng(5)
    samples = [encode_sample(random_sample(rng, f"bad{i}")) for i in range(5)]
    del samples[1]["semantic_codes.npy"]
    bad = random_sample(rng, "bad2")
    bad.pixel_codes[0, 0] = CODEBOOK + 3
    samples[2] = encode_sample(bad)
    samples[3]["json"] = json.dumps({"schema_version": 7, "image_size": [1, 1], "source_key": "x"}).encode()
    write_atomic(f"{d}/shard-000002.tar", tar_bytes((f"bad{i}", s) for i, s in enumerate(samples)))
    return d


def test_bad_inputs_raise_with_the_shard_and_key(bad_dir):
    loader = PackedMultimodalLoader(loader_config(bad_dir, split="sample", pack_window=200), TOKENS)
    with pytest.raises(TokenShardError) as info:
        next(loader)
    msg = str(info.value)
    assert ("shard-000001.tar" in msg and "truncated" in msg) or ("shard-000002.tar" in msg and "'bad" in msg), msg


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_inputs_are_skipped_and_counted(bad_dir, caplog, num_workers):
    cfg = loader_config(bad_dir, on_error="skip", num_workers=num_workers, split="sample")
    loader = PackedMultimodalLoader(cfg, TOKENS)
    keys = _epoch_zero_keys([loader])
    # Lost: 3 truncated samples of shard 1, 3 bad samples of shard 2.
    good = {f"s0x{i:05d}" for i in range(20) if not 5 + 2 <= i < 10} - {f"s0x{i:05d}" for i in range(10, 15)}
    good |= {"bad0", "bad4"}
    assert sorted(keys) == sorted(good)
    assert loader.stats["skipped_corrupt"] >= 6
    if num_workers == 0:
        text = caplog.text
        assert "missing field(s) ['semantic_codes.npy']" in text and "holds code 35" in text
        assert "schema_version is 7" in text and "truncated or damaged tar" in text


def test_manifest_listing_a_missing_shard(tmp_path):
    write_dataset(str(tmp_path), num_samples=10, per_shard=5)
    (tmp_path / "shard-000001.tar").unlink()
    assert read_manifest(str(tmp_path)).num_samples == 10
    with pytest.raises(TokenShardError, match="shard-000001.tar.*cannot open tar"):
        _take(PackedMultimodalLoader(loader_config(str(tmp_path), split="sample", pack_window=100), TOKENS), 3)


# ----------------------------------------------------------------------------- config


def test_config_section_round_trips_and_validates(data_dir):
    cfg = config_from_dict({"loader": {"paths": [data_dir], "seq_len": 128, "split": "sample"}})
    cfg.validate()
    assert cfg.loader.seq_len == 128 and cfg.loader.split == "sample"
    with pytest.raises(ConfigError, match="loader.cfg_drop_rate: got 1.5"):
        config_from_dict({"loader": {"paths": [data_dir], "cfg_drop_rate": 1.5}}).validate()
    with pytest.raises(ConfigError, match="loader.split"):
        config_from_dict({"loader": {"paths": [data_dir], "split": "row"}})
    with pytest.raises(ConfigError, match="loader.paths"):
        config_from_dict({"loader": {"paths": []}}).validate()
