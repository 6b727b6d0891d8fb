import pytest

import itertools

from megadual.data.scenes import (ALL_COMBINATIONS, ATTRIBUTES, UNSEEN_COMBINATIONS, Scene, describe, parse_caption,
                                  sample_scene)


def test_sampling_is_deterministic_per_index():
    assert sample_scene(3, 17) == sample_scene(3, 17)
    assert len({sample_scene(3, i, "all") for i in range(400)}) == len(ALL_COMBINATIONS)


def test_every_caption_parses_back_to_its_scene():
    for i in range(500):
        scene = sample_scene(0, i, "all")
        assert parse_caption(describe(scene)) == scene


def test_training_never_draws_an_unseen_combination_and_held_out_sets_do():
    training = {sample_scene(0, i) for i in range(3000)}
    held_out = [sample_scene(1, i, "all") for i in range(3000)]
    assert not any(s.unseen for s in training)
    assert {(s.shape, s.colour, s.side) for s in training} == set(ALL_COMBINATIONS) - UNSEEN_COMBINATIONS
    share = sum(s.unseen for s in held_out) / len(held_out)
    assert 0.2 <= len(UNSEEN_COMBINATIONS) / len(ALL_COMBINATIONS) and 0.2 <= share <= 0.3
    # Every pair of attribute values is trained: an unseen scene is new only as a whole.
    for a, b in itertools.combinations(ATTRIBUTES, 2):
        trained = {(getattr(s, a), getattr(s, b)) for s in training}
        assert trained == {(getattr(s, a), getattr(s, b)) for s in held_out}, (a, b)


def test_an_unknown_combination_set_is_refused():
    with pytest.raises(ValueError, match="combinations must be one of"):
        sample_scene(0, 0, "unseen")


def test_parse_rejects_ungrammatical_text():
    assert describe(Scene("star", "red", "left")) == "a red star on the left"
    for text in ["a red star", "a red star on the left!", "a grey star on the left", "a red hexagon on the left",
                 "a red star on the top", "red star on the left", ""]:
        assert parse_caption(text) is None, text
