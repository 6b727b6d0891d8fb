"""`train_tokenizer` on the debug config: it learns (the issue's figures), exports a tokenizer
that round-trips held-out images, resumes on the uninterrupted trajectory, skips and counts a
corrupt image, and runs data parallel on 2 ranks under the `deepspeed` launcher with identical
codebooks. Single-process runs are forked (a world of one) so pytest never holds a group.

`test_debug_config_learns` is the long one (the training run of the Must-show figures,
~1-3 minutes on a 2-core machine); every other training test runs a handful of steps.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import deepspeed  # noqa: F401  (imported once so forked ranks inherit it)
import pytest
import torch

from megadual.config import load_config
from megadual.data.images import SyntheticDataset
from megadual.data.synthetic_images import write_synthetic_shards
from megadual.launch import run_deepspeed
from megadual.losses import psnr, ssim
from megadual.models.vision.tokenizer import DualTokenizer
from megadual.train.tokenizer import train_tokenizer
from tests._dist import run_distributed

DEBUG_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug", "tokenizer.yaml")
LEARN_STEPS = 200  # the figures are reached by ~150 steps; the margin absorbs a busy machine
HELD_OUT_SEED = 1  # the training set is seed 0


def _config(run_dir, *overrides):
    return load_config(DEBUG_CONFIG, [f"run.out_dir={run_dir}", *overrides])


def _train(rank, world_size, run_dir, overrides, resume=False):
    result = train_tokenizer(_config(run_dir, *overrides), resume=resume, show_progress=False)
    return result.steps_run


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _mean(records, key):
    return sum(r[key] for r in records) / len(records)


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    """The debug config trained for LEARN_STEPS steps (once for the module)."""
    run_dir = str(tmp_path_factory.mktemp("learn"))
    run_distributed(_train, world_size=1, timeout=900,
                    args=(run_dir, [f"tokenizer_train.steps={LEARN_STEPS}", "tokenizer_train.image_every=100"]))
    return run_dir


def test_debug_config_learns(learned_run):
    records = _records(learned_run)
    assert [r["step"] for r in records] == list(range(1, LEARN_STEPS + 1))
    start, end = records[0], records[-10:]  # record 1 is measured before the first update
    assert _mean(end, "psnr") >= start["psnr"] + 6.0, (start["psnr"], _mean(end, "psnr"))
    assert _mean(end, "usage_pixel") > 0.25 and _mean(end, "usage_semantic") > 0.25
    assert _mean(end, "semantic_cos") > 0.9 and _mean(end, "pooled_cos") > 0.9
    assert _mean(end, "loss") < 0.5 * start["loss"]
    gan = [r for r in records if r["step"] > 100]  # discriminator.start_step = 100 in the debug config
    assert all(r["gan_d"] > 0 and 0.3 <= r["adaptive_weight"] <= 10.0 for r in gan)
    assert all(r["gan_d"] == 0 and r["adaptive_weight"] == 0 for r in records[:100])
    for name in ("step_000100_recon.png", "step_000100_usage.png", f"step_{LEARN_STEPS:06d}_recon.png"):
        assert os.path.getsize(os.path.join(learned_run, "images", name)) > 0, name
    assert open(os.path.join(learned_run, "checkpoints", "latest")).read().strip() == f"step_{LEARN_STEPS:06d}"


def test_held_out_round_trip(learned_run):
    tokenizer = DualTokenizer.from_pretrained(os.path.join(learned_run, "tokenizer"))
    held_out = SyntheticDataset(HELD_OUT_SEED, 64, tokenizer.image_size)
    images = torch.stack([held_out[i].image for i in range(len(held_out))])
    pixel_codes, semantic_codes = tokenizer.encode(images)
    assert pixel_codes.shape == semantic_codes.shape == (64, 64, 2) and pixel_codes.dtype == torch.int64
    reconstructions = tokenizer.decode(pixel_codes)
    assert reconstructions.shape == images.shape and reconstructions.dtype == torch.float32
    start_psnr = _records(learned_run)[0]["psnr"]
    held_psnr, held_ssim = float(psnr(reconstructions, images)), float(ssim(reconstructions, images))
    assert held_psnr >= start_psnr + 6.0, (start_psnr, held_psnr)
    assert held_ssim > 0.5, held_ssim
    for codes in (pixel_codes, semantic_codes):  # codebook utilisation over the held-out set
        assert codes.unique().numel() / 128 > 0.25


def _shards_with_a_corrupt_image(directory):
    """16 synthetic samples in 2 shards plus a third shard holding one undecodable PNG."""
    write_synthetic_shards(directory, num=16, size=32, seed=0, shard_size=8)
    data = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
    with tarfile.open(os.path.join(directory, "zz-corrupt.tar"), "w") as tar:
        info = tarfile.TarInfo("broken.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_resume_continues_the_same_metrics_and_counts_a_corrupt_image(tmp_path):
    _shards_with_a_corrupt_image(str(tmp_path / "shards"))
    overrides = ["tokenizer_train.steps=6", "tokenizer_train.save_every=3", "tokenizer_train.micro_batch_size=4",
                 "tokenizer.discriminator.start_step=2", "tokenizer.loss.lpips_weight=0.0",
                 "images.source=webdataset", f"images.paths=[{tmp_path / 'shards'}]"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_distributed(_train, world_size=1, timeout=300, args=(str(straight), overrides))
    expected = _records(straight)
    # 17 samples, batches of 4: 4 batches an epoch and 6 steps, so the corrupt one is met once or twice.
    assert expected[-1]["corrupt_images"] >= 1
    assert sum(r["images"] for r in expected) == 6 * 4 - expected[-1]["corrupt_images"]

    # As if killed after the step-3 checkpoint: drop what came later.
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000006")
    (resumed / "checkpoints" / "latest").write_text("step_000003")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in expected[:3]))
    assert run_distributed(_train, world_size=1, timeout=300, args=(str(resumed), overrides, True)) == [3]
    got = _records(resumed)
    assert [r["step"] for r in got] == list(range(1, 7))
    skip = {"step_time", "grad_norm"}  # wall time; grad_norm is None without ZeRO
    for want, have in zip(expected[3:], got[3:]):
        assert {k: v for k, v in have.items() if k not in skip} == {k: v for k, v in want.items() if k not in skip}
    assert expected[3]["gan_d"] > 0  # the discriminator (and its optimizer) were restored too


def test_two_rank_deepspeed_run_keeps_codebooks_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # the launched ranks inherit it; no network either way
    run_dir = tmp_path / "run"
    args = ["train-tokenizer", "--config", DEBUG_CONFIG, "--set", f"run.out_dir={run_dir}",
            "--set", "tokenizer_train.steps=16", "--set", "tokenizer_train.micro_batch_size=8",
            "--set", "tokenizer_train.zero_stage=2", "--set", "tokenizer.discriminator.start_step=10",
            "--set", "tokenizer.loss.lpips_weight=0.0", "--set", "tokenizer_train.wandb_project=megadual-test",
            "--set", "tokenizer_train.replica_check_every=1"]  # every step: EMA codebooks and parameters agree
    run_deepspeed(2, args, timeout=600, log_path=str(tmp_path / "launch.log"))
    digests = [json.loads((run_dir / "ranks" / f"rank_{r}_codebooks.json").read_text()) for r in range(2)]
    assert digests[0] == digests[1]
    records = _records(run_dir)
    assert [r["step"] for r in records] == list(range(1, 17))
    assert records[0]["images"] == 16  # both ranks' images counted
    assert records[-1]["gan_d"] > 0  # the discriminator engine trained too
    assert _mean(records[-3:], "loss") < 0.8 * _mean(records[:3], "loss")
    assert _mean(records[-3:], "psnr") > records[0]["psnr"] + 2.0
    assert records[-1]["grad_norm"] > 0  # ZeRO-2 reports the global norm
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # rank 0 only


def test_semantic_teacher_is_the_initial_tower_or_the_named_directory(tmp_path):
    from megadual.models.vision.tower import build_siglip
    from megadual.train.tokenizer import build_semantic_teacher

    cfg = _config(str(tmp_path / "run"))
    model = DualTokenizer(cfg.tokenizer, seed=0)
    initial = build_semantic_teacher(cfg.tokenizer, model)
    assert all(torch.equal(a, b) for a, b in zip(initial.parameters(), model.tower.parameters()))
    assert not any(p.requires_grad for p in initial.parameters())

    other = build_siglip(cfg.tokenizer.tower, seed=7)  # stands in for a pre-trained tower
    other.save_pretrained(str(tmp_path / "teacher"))
    named = _config(str(tmp_path / "run"), f"tokenizer.loss.semantic_teacher_path={tmp_path / 'teacher'}")
    teacher = build_semantic_teacher(named.tokenizer, model)
    assert all(torch.equal(a, b) for a, b in zip(teacher.model.parameters(), other.parameters()))
    assert not any(p.requires_grad for p in teacher.parameters())
    # The tower itself still starts where tokenizer.tower says (here: random from the seed).
    assert not torch.equal(teacher.model.embeddings.patch_embedding.weight,
                           model.tower.model.embeddings.patch_embedding.weight)

    missing = _config(str(tmp_path / "run"), f"tokenizer.loss.semantic_teacher_path={tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="semantic_teacher_path: .* is not a directory"):
        build_semantic_teacher(missing.tokenizer, model)


def test_tower_learns_at_its_scaled_rate_and_everything_else_at_the_full_one(tmp_path):
    from megadual.config import ConfigError
    from megadual.train.tokenizer import _generator_param_groups

    model = DualTokenizer(_config(str(tmp_path)).tokenizer, seed=0)
    groups = _generator_param_groups(model, weight_decay=0.1, lr=1e-3, tower_lr_scale=0.1)
    tower = {id(p) for p in model.tower.parameters()}
    grouped = [p for g in groups for p in g["params"]]
    assert sorted(map(id, grouped)) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each once
    assert not any(id(p) in tower for p in groups[0]["params"])  # metrics.jsonl logs the first group's rate
    for g in groups:
        in_tower = {id(p) in tower for p in g["params"]}
        assert len(in_tower) == 1  # a group is all tower or all the rest
        assert g["lr"] == pytest.approx(1e-4 if in_tower == {True} else 1e-3)
        assert g["weight_decay"] == (0.1 if all(p.dim() >= 2 for p in g["params"]) else 0.0)
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match=r"tokenizer_train.tower_lr_scale: got .*, expected a fraction in \(0, 1\]"):
            _config(str(tmp_path), f"tokenizer_train.tower_lr_scale={bad}")


def _train_dying_on_the_export_config(rank, world_size, run_dir, overrides):
    import megadual.models.vision.tokenizer as tokenizer_module

    write = tokenizer_module.write_atomic

    def dying(path, data):
        if os.path.basename(path) == "config.json":
            os._exit(9)  # as a kill -9 between the export's weights and its config
        write(path, data)

    tokenizer_module.write_atomic = dying
    return _train(rank, world_size, run_dir, overrides)


def test_a_kill_during_the_export_is_repaired_by_resume(tmp_path):
    from megadual.train.checkpoint import load_model_state
    from tests._dist import RankError

    overrides = ["tokenizer_train.steps=2", "tokenizer_train.micro_batch_size=2", "tokenizer.loss.lpips_weight=0.0"]
    with pytest.raises(RankError) as info:
        run_distributed(_train_dying_on_the_export_config, world_size=1, timeout=300, args=(str(tmp_path), overrides))
    assert info.value.exitcode == 9
    export = str(tmp_path / "tokenizer")
    assert not DualTokenizer.is_complete_export(export) and not os.path.exists(os.path.join(export, "config.json"))

    assert run_distributed(_train, world_size=1, timeout=300, args=(str(tmp_path), overrides, True)) == [0]
    assert DualTokenizer.is_complete_export(export)
    trained = load_model_state(str(tmp_path))
    exported = DualTokenizer.from_pretrained(export).state_dict()
    assert all(torch.equal(exported[k].float(), trained[k]) for k in trained if k in exported)
    assert exported.keys() & trained.keys()


def test_usage_png_counts_codes_above_the_restart_level():
    from megadual.train.visualize import share_in_use

    restarted = torch.tensor([1.0] * 6 + [5.0] * 4)  # a restart sets a count exactly to the level
    assert share_in_use(restarted, restart_level=1.0) == pytest.approx(0.4)
    per_depth = torch.tensor([[1.0, 3.0, 1.0, 1.0], [2.0, 1.0, 1.0, 1.0]])
    assert share_in_use(per_depth, restart_level=1.0) == pytest.approx(0.5)


@pytest.mark.parametrize("settings", [["parallel.tp=2"], ["parallel.pp=2", "parallel.zero_stage=1"],
                                      ["parallel.zero_stage=2"]], ids=["tp", "pp", "zero"])
def test_a_model_parallel_layout_is_refused_not_ignored(tmp_path, settings):
    """Before: train-tokenizer ran data parallel whatever `parallel:` said."""
    from megadual.config import ConfigError

    key = settings[0].split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: got 2, expected .*: train-tokenizer runs data parallel only"):
        train_tokenizer(_config(str(tmp_path), *settings), show_progress=False)
    assert not torch.distributed.is_initialized()
