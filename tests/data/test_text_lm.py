import pytest
import torch

from megadual.data.text_lm import IGNORE_INDEX, ByteTokenizer, PackedTextLoader, collate_rows, pack_rows


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("a red ☃")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:]) == "a red ☃"


def test_packing_keeps_documents_whole_and_drops_long_ones():
    docs = [[1] * 5, [2] * 4, [3] * 9, [4] * 3, [5] * 2]
    rows, dropped = pack_rows(docs, seq_len=8, pad_id=0)
    assert dropped == 1  # the 9-token document
    assert [r.segments for r in rows] == [[5, 3], [4, 3, 1], [2, 6]]
    assert rows[0].tokens == [1] * 5 + [0] * 3
    assert rows[1].tokens == [2] * 4 + [4] * 3 + [0]


def test_collate_labels_positions_and_offsets():
    rows, _ = pack_rows([[10, 11, 12], [20, 21], [30, 31, 32, 33]], seq_len=6, pad_id=0)
    batch = collate_rows(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 0], [30, 31, 32, 33, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    ig = IGNORE_INDEX
    assert batch["labels"].tolist() == [[11, 12, ig, 21, ig, ig], [31, 32, 33, ig, ig, ig]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 6, 10, 12]


def test_loader_resume_and_rank_split():
    docs = [f"caption number {i}" for i in range(100)]
    full = PackedTextLoader(docs, seq_len=64, batch_size=2, seed=5)
    expected = [next(full) for _ in range(30)]  # crosses epoch boundaries
    resumed = PackedTextLoader(docs, seq_len=64, batch_size=2, seed=5)
    for _ in range(11):
        next(resumed)
    state = resumed.state_dict()
    fresh = PackedTextLoader(docs, seq_len=64, batch_size=2, seed=5)
    fresh.load_state_dict(state)
    for want in expected[11:]:
        got = next(fresh)
        assert all(torch.equal(got[k], want[k]) for k in want)

    ranks = [PackedTextLoader(docs, seq_len=64, batch_size=1, seed=5, rank=r, world_size=2) for r in range(2)]
    rows = [tuple(next(loader)["input_ids"][0].tolist()) for loader in ranks for _ in range(len(loader._rows))]
    assert len(rows) == len(set(rows))  # no row shared by the two ranks in an epoch


def test_loader_rejects_text_that_never_fits():
    with pytest.raises(ValueError, match="no document fits in train.seq_len=8"):
        PackedTextLoader(["a sentence longer than eight bytes"], seq_len=8, batch_size=4)


def test_a_small_epoch_runs_on_into_the_next():
    loader = PackedTextLoader(["a b"], seq_len=64, batch_size=4)  # one row per epoch
    assert next(loader)["input_ids"].shape == (4, 64)
