"""The loader positions a training checkpoint carries: one per data-parallel rank."""

from __future__ import annotations

import pytest

from megadual.train.loop import gather_loader_states, own_loader_state


class _Loader:
    def __init__(self, position: int):
        self.position = position

    def state_dict(self) -> dict:
        return {"position": self.position}


def test_a_world_of_one_saves_its_own_position():
    assert gather_loader_states(_Loader(7), dp_rank=0, dp_size=1) == [{"position": 7}]


def test_each_rank_gets_its_own_position_back():
    saved = [{"position": 3}, {"position": 5}]
    assert [own_loader_state(saved, r, 2) for r in range(2)] == saved


def test_a_single_state_from_older_checkpoints_still_loads_on_one_rank():
    assert own_loader_state({"position": 3}, 0, 1) == {"position": 3}


def test_another_data_parallel_size_is_refused_by_name():
    with pytest.raises(ValueError, match="2 data-parallel ranks, this run has 4"):
        own_loader_state([{"position": 3}, {"position": 5}], 0, 4)
