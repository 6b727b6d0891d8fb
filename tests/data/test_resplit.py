"""Loader positions continued on another number of data-parallel ranks: every item not yet read
is read exactly once (none skipped, none repeated), for the three loaders and the split beneath
the text and image ones."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from megadual.config.schema import ImageDataConfig
from megadual.data.images import ImageBatchLoader, build_image_dataset
from megadual.data.packed_loader import PackedMultimodalLoader
from megadual.data.shares import Split, continue_split
from megadual.data.text_lm import PackedTextLoader

from .token_fixtures import TOKENS, loader_config, write_dataset


def _brute_force_taken(split: Split, taken: list[int]) -> set[int]:
    world = len(taken)
    return {split.item(r, world, i) for r, t in enumerate(taken) for i in range(t)}


def test_split_after_any_counts_hands_out_exactly_the_untaken_items():
    rng = random.Random(0)
    for _ in range(200):
        split, seen = Split(), Counter()
        for _ in range(rng.randint(1, 4)):  # a chain of resizes
            world = rng.randint(1, 5)
            taken = [rng.randint(0, 6) for _ in range(world)]
            seen.update(_brute_force_taken(split, taken))
            split = split.after(taken)
        assert max(seen.values(), default=1) == 1  # nothing read twice
        horizon = max(seen, default=0) + 1
        untaken = [g for g in range(horizon + 10) if g not in seen]
        assert [split.remaining(k) for k in range(len(untaken))] == untaken  # nothing skipped


def _text_loader(rank, world):
    docs = [f"caption number {i}" for i in range(40)]
    return PackedTextLoader(docs, seq_len=48, batch_size=2, seed=5, rank=rank, world_size=world)


def _rows(batch):
    return [tuple(row) for row in batch["input_ids"].tolist()]


def _read_in_phases(make, phases, read):
    """Read `steps` batches per rank for each (world, steps) phase, resuming from every rank's
    JSON-saved state in between; returns what each phase read, flattened."""
    seen, states = [], None
    for world, steps in phases:
        loaders = [make(r, world) for r in range(world)]
        for loader in loaders:
            if states is not None:
                loader.load_global_state(json.loads(json.dumps(states)))
        for _ in range(steps):
            for loader in loaders:
                seen.extend(read(next(loader)))
        states = [loader.state_dict() for loader in loaders]
    return seen


@pytest.mark.parametrize("phases", [[(2, 5), (1, 10)], [(1, 6), (2, 3)], [(2, 3), (3, 4), (1, 5)]])
def test_text_rows_continue_on_another_size_exactly_once(phases):
    got = _read_in_phases(_text_loader, phases, _rows)
    total = sum(world * steps for world, steps in phases)
    want = _read_in_phases(_text_loader, [(1, total)], _rows)  # one reader, the same number of batches
    assert Counter(got) == Counter(want)  # 40 documents pack into ~20 rows an epoch: crosses epochs


def test_image_samples_continue_on_another_size_exactly_once():
    ds = build_image_dataset(ImageDataConfig(source="synthetic", num_samples=14, seed=1), image_size=16)

    def make(rank, world):
        return ImageBatchLoader(ds, batch_size=2, rank=rank, world_size=world, seed=5)

    got = _read_in_phases(make, [(2, 4), (3, 2), (1, 3)], lambda b: b["keys"])
    want = _read_in_phases(make, [(1, 2 * 4 + 3 * 2 + 3)], lambda b: b["keys"])
    assert Counter(got) == Counter(want)  # 34 samples of a 14-sample set: three epochs


def test_ranks_that_ran_ahead_leave_their_items_out_of_the_next_split():
    # Rank 1 skipped a batch of corrupt images and took 4 more samples than rank 0.
    states = [{"split": {"start": 0, "skip": []}, "world_size": 2, "taken": t} for t in (6, 10)]
    split = continue_split(states)
    taken = {Split().item(r, 2, i) for r, t in enumerate((6, 10)) for i in range(t)}
    assert split.start == 12 and set(split.skip) == {13, 15, 17, 19} and not taken & {split.remaining(k) for k in range(20)}


def test_states_of_different_runs_are_refused():
    states = [{"split": {"start": 0, "skip": []}, "world_size": 2, "taken": 3},
              {"split": {"start": 4, "skip": []}, "world_size": 2, "taken": 3}]
    with pytest.raises(ValueError, match="not those of one run's data-parallel ranks"):
        continue_split(states)


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    write_dataset(str(d), num_samples=40, per_shard=10)
    return str(d)


def _samples(batch):
    return [tuple(m[:3]) for row in batch["samples"] for m in row]  # (epoch, shard, position)


@pytest.mark.parametrize("phases,num_workers", [([(2, 6), (1, 12)], (0, 0)), ([(1, 8), (2, 4)], (0, 0)),
                                                ([(2, 5), (1, 10)], (1, 2))])
def test_multimodal_streams_continue_on_another_size_exactly_once(token_dir, phases, num_workers):
    """Streams keep their samples; a rank that inherits two streams alternates their batches, so
    after k + 2m batches on one rank the streams stand where k + m steps on two would leave them."""

    def make(phase):
        def build(rank, world):
            cfg = loader_config(token_dir, batch_size=2, pack_window=8, split="sample", num_streams=2,
                                num_workers=num_workers[phase])
            return PackedMultimodalLoader(cfg, TOKENS, rank=rank, world_size=world)
        return build

    seen, states = [], None
    for phase, (world, steps) in enumerate(phases):
        loaders = [make(phase)(r, world) for r in range(world)]
        for loader in loaders:
            if states is not None:
                loader.load_global_state(json.loads(json.dumps(states)))
            for _ in range(steps):
                seen.extend(_samples(next(loader)))
        states = [loader.state_dict() for loader in loaders]
        for loader in loaders:
            loader.close()
    two_rank_steps = sum(steps * world // 2 for world, steps in phases)
    want = _read_in_phases(make(0), [(2, two_rank_steps)], _samples)
    assert Counter(seen) == Counter(want) and max(Counter(seen).values()) == 1


def test_a_stream_count_the_new_size_cannot_share_is_refused(token_dir):
    saved = [PackedMultimodalLoader(loader_config(token_dir, split="sample"), TOKENS, rank=r, world_size=2).state_dict()
             for r in range(2)]
    four = PackedMultimodalLoader(loader_config(token_dir, split="sample"), TOKENS, rank=0, world_size=4)
    with pytest.raises(ValueError, match="split into 2 loader streams, which 4 data-parallel ranks x 1 readers"):
        four.load_global_state(saved)


def test_positions_written_before_the_shared_split_continue_where_they_stood():
    # The old text loader: rank r of 2 took rows r, r + 2, ... of each epoch; 3 batches of 2 were read.
    old = [{"epoch": 1, "next_row": 6, "seed": 5}] * 2
    loader = _text_loader(0, 1)
    loader.load_global_state(old)
    first_epoch = len(loader._epoch_rows(0))
    assert loader.split == Split(first_epoch + 12)
    # The old image loader: epoch 2, 3 batches of 2 on each of 2 ranks.
    ds = build_image_dataset(ImageDataConfig(source="synthetic", num_samples=14, seed=1), image_size=16)
    images = ImageBatchLoader(ds, batch_size=2, rank=0, world_size=1, seed=5)
    images.load_global_state([{"epoch": 2, "position": 3, "num_corrupt": 1}, {"epoch": 2, "position": 3, "num_corrupt": 0}])
    assert images.split == Split(2 * 14 + 12) and images.num_corrupt == 1
