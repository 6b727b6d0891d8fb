"""The loader positions a training checkpoint carries: one per data-parallel rank."""

from __future__ import annotations

from megadual.train.loop import gather_loader_states, saved_loader_states


class _Loader:
    def __init__(self, position: int):
        self.position = position

    def state_dict(self) -> dict:
        return {"position": self.position}


def test_a_world_of_one_saves_its_own_position():
    assert gather_loader_states(_Loader(7), dp_rank=0, dp_size=1) == [{"position": 7}]


def test_every_rank_position_is_handed_to_the_loader():
    saved = [{"position": 3}, {"position": 5}]
    assert saved_loader_states(saved) == saved


def test_a_single_state_from_older_checkpoints_is_a_list_of_one():
    assert saved_loader_states({"position": 3}) == [{"position": 3}]
