"""`megadual synth-data`: deterministic shards whose pictures show what their labels say."""

import hashlib
import json
import tarfile

import numpy as np
import pytest

from megadual.cli import main as cli_main
from megadual.data.scenes import BACKGROUND_RGB, COLOURS, parse_caption, sample_scene
from megadual.data.synthetic_images import render_scene, shape_placement, synthetic_sample, write_synthetic_shards


def _digest(paths):
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


def test_shards_are_deterministic_and_complete(tmp_path):
    a = write_synthetic_shards(str(tmp_path / "a"), num=12, size=32, seed=3, shard_size=5)
    b = write_synthetic_shards(str(tmp_path / "b"), num=12, size=32, seed=3, shard_size=5)
    assert [p.rsplit("/", 1)[1] for p in a] == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(write_synthetic_shards(str(tmp_path / "c"), num=12, size=32, seed=4, shard_size=5))
    with tarfile.open(a[2]) as tar:
        names = tar.getnames()
        assert names == [f"{i:08d}.{ext}" for i in (10, 11) for ext in ("png", "txt", "json")]
        labels = json.loads(tar.extractfile("00000011.json").read())
        caption = tar.extractfile("00000011.txt").read().decode()
    scene = parse_caption(caption)
    assert scene is not None and scene.labels() == {k: labels[k] for k in scene.labels()}
    assert (labels["seed"], labels["index"], labels["image_size"], labels["caption"]) == (3, 11, 32, caption)
    assert labels["unseen"] is False
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["num"] == 12 and len(manifest["shards"]) == 3 and manifest["combinations"] == "seen"


def test_a_held_out_set_labels_its_unseen_combinations(tmp_path):
    write_synthetic_shards(str(tmp_path), num=40, size=16, seed=1, combinations="all")
    with tarfile.open(tmp_path / "shapes-000000.tar") as tar:
        labels = [json.loads(tar.extractfile(n).read()) for n in tar.getnames() if n.endswith(".json")]
    assert any(lab["unseen"] for lab in labels) and not all(lab["unseen"] for lab in labels)
    assert all(sample_scene(1, lab["index"], "all").unseen == lab["unseen"] for lab in labels)


def test_pictures_show_their_labels():
    checked = 0
    for index in range(40):
        image, caption, labels = synthetic_sample(7, index, 64)
        scene = parse_caption(caption)
        assert scene.labels() == {k: labels[k] for k in ("shape", "colour", "side")}
        pixels = np.asarray(image).astype(int)
        cx, cy, _ = shape_placement(scene, 64, 7, index)
        assert (cx < 32) == (scene.side == "left")
        centre = pixels[int(cy), int(cx)]
        assert np.abs(centre - COLOURS[labels["colour"]]).max() <= 2, (caption, centre)
        # Every corner shows the background (within the gradient's swing).
        for corner in (pixels[0, 0], pixels[0, 63], pixels[63, 0], pixels[63, 63]):
            assert np.abs(corner - BACKGROUND_RGB).max() <= 20, (caption, corner)
        checked += 1
    assert checked == 40


def test_cli_writes_shards_and_rejects_bad_sizes(tmp_path, capsys):
    assert cli_main(["synth-data", "--out", str(tmp_path / "d"), "--num", "3", "--size", "16"]) == 0
    assert (tmp_path / "d" / "shapes-000000.tar").is_file()
    assert cli_main(["synth-data", "--out", str(tmp_path / "e"), "--num", "0"]) == 2
    assert "--num must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="size must be at least 8"):
        render_scene(sample_scene(0, 0), 4)
