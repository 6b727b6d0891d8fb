from megadual.data.scenes import COLOURS, POSITIONS, SHAPES, SIZES, Scene, describe, parse_caption, sample_scene


def test_sampling_is_deterministic_per_index():
    assert sample_scene(3, 17) == sample_scene(3, 17)
    assert len({sample_scene(3, i) for i in range(200)}) > 150


def test_every_caption_parses_back_to_its_scene():
    seen = set()
    for i in range(2000):
        scene = sample_scene(0, i)
        assert scene.colour != scene.background
        assert parse_caption(describe(scene)) == scene
        seen.add((scene.shape, scene.colour, scene.size, scene.position))
    assert {s[0] for s in seen} == set(SHAPES)
    assert {s[1] for s in seen} == set(COLOURS)
    assert {s[2] for s in seen} == set(SIZES)
    assert {s[3] for s in seen} == set(POSITIONS)


def test_parse_rejects_ungrammatical_text():
    assert describe(Scene("star", "red", "large", "center", "blue")) == "a large red star in the center on a blue background"
    for text in [
        "a large red star in the center on a blue",
        "a huge red star at the top on a blue background",
        "a large red star at the center on a blue background",
        "a large red star at the top left on a blue background!",
        "",
    ]:
        assert parse_caption(text) is None, text
