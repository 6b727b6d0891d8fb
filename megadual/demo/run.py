"""The embedded end-to-end run: every stage of MegaDual on CPU, each as a user would run it.

1. data: `synth-data` renders the training scenes and a held-out set (another seed, every
   attribute combination, the ones training never shows among them);
2. teacher: the tokenizer's SigLIP tower pre-trained on the captions (`teacher.py`);
3. tokenizer: `train-tokenizer`, started from that tower, on 2 data-parallel ranks started by
   the `deepspeed` launcher;
4. tokens: `extract` encodes the training images into token shards with that tokenizer;
5. probe: what the codes carry, per attribute and code branch (`probe.py`);
6. mllm: `train` trains the unified model on the token shards, 2 ranks from the `deepspeed`
   launcher (data parallel, ZeRO-1), its code tables initialised from the tokenizer;
7. hf: `convert to-hf` turns the training checkpoint into a Hugging Face directory;
8. evaluate: from that directory alone, generate an image per held-out caption and caption
   every held-out image; judge both against the held-out labels (`evaluate.py`);
9. curve: the same judgement at the earlier unified-model checkpoints;
then report.md, report.json and the PNGs (`report.py`).

Stages 1-9 are reused on rerun when finished with the same inputs (`stages.py`); the report is
always rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from megadual.config import load_config
from megadual.data import scenes, synthetic_images
from megadual.data.synthetic_images import write_synthetic_shards
from megadual.inference.mllm import load_for_inference, to_pil
from megadual.launch import megadual_command, run_command, run_deepspeed
from megadual.models.vision.tokenizer import DualTokenizer
from megadual.train.checkpoint import checkpoint_steps
from megadual.train.loop import step_tag
from megadual.train.tracking import plot_losses

from .evaluate import judge_captions, judge_generation, load_scene_shards, read_back, reconstruction_quality
from .teacher import TeacherPlan, train_teacher
from .probe import chance_levels, encode_code_set, probe_codes, read_token_codes
from .report import save_judged_grid, write_report
from .stages import StageRecord, StageRunner

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER_CONFIG = "configs/demo/tokenizer.yaml"
MLLM_CONFIG = "configs/demo/mllm.yaml"
RANKS = 2
MLLM_LAYOUT = ("parallel.tp=1", "parallel.pp=1", "parallel.zero_stage=1")  # 2 data-parallel ranks
HELD_OUT_SEED = 1  # the training scenes use seed 0
IMAGE_SIZE = 32
PROBE_TRAIN_CODES = 8192  # the probes' training set: half the token shards is plenty for a dozen small classifiers
STAGE_TIMEOUT_S = 3600


@dataclass(frozen=True)
class DemoPlan:
    """Stage sizes: the full run (sized for 15 minutes on 2 cores; measured in docs/demo_tuning.md)
    or the --quick smoke run."""

    train_images: int
    held_out_images: int
    teacher_steps: int
    tokenizer_steps: int
    mllm_steps: int
    probe_steps: int
    curve_points: int = 4  # unified-model checkpoints evaluated for the learning curve (the last is the export)


FULL = DemoPlan(train_images=16384, held_out_images=144, teacher_steps=400, tokenizer_steps=600, mllm_steps=1700,
                probe_steps=200)
QUICK = DemoPlan(train_images=256, held_out_images=12, teacher_steps=10, tokenizer_steps=20, mllm_steps=20,
                 probe_steps=10)


def repo_path(path: str) -> str:
    """A path inside the repository, wherever the demo is started from."""
    return os.path.join(REPO_ROOT, path)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return list({r["step"]: r for r in records}.values())  # a resumed run appends: keep each step's last


def _mean(records: list[dict], key: str) -> float:
    # A step can lack a part (no text token in its batch): its value is None.
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.fmean(values) if values else float("nan")


def _world_fingerprint() -> str:
    """What decides the scenes beyond their counts: the grammar and the renderer's source, the image size."""
    digest = hashlib.sha256(str(IMAGE_SIZE).encode())
    for module in (scenes, synthetic_images):
        digest.update(_read(module.__file__).encode("utf-8"))
    return digest.hexdigest()[:16]


def _settings(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def make_data(out: str, plan: DemoPlan) -> dict:
    started = time.perf_counter()
    write_synthetic_shards(os.path.join(out, "train"), plan.train_images, size=IMAGE_SIZE, seed=0, show_progress=True)
    write_synthetic_shards(os.path.join(out, "held_out"), plan.held_out_images, size=IMAGE_SIZE, seed=HELD_OUT_SEED,
                           combinations="all")
    seconds = time.perf_counter() - started
    total = plan.train_images + plan.held_out_images
    return {"images": total, "images_per_s": total / seconds}


def pretrain_teacher(out: str, data: StageRecord, plan: DemoPlan) -> dict:
    """The SigLIP tower the tokenizer starts from and distils its semantic codes from (teacher.py)."""
    train = load_scene_shards(os.path.join(data.directory, "train"))
    tower_cfg = load_config(repo_path(TOKENIZER_CONFIG)).tokenizer.tower
    threads = torch.get_num_threads()
    torch.set_num_threads(min(RANKS, os.cpu_count() or 1))  # the stage has the machine to itself
    try:
        return train_teacher(tower_cfg, train.images, train.captions, TeacherPlan(steps=plan.teacher_steps),
                             os.path.join(out, "tower"))
    finally:
        torch.set_num_threads(threads)


def train_tokenizer(out: str, data: StageRecord, teacher: StageRecord, plan: DemoPlan) -> dict:
    args = ["train-tokenizer", "--config", repo_path(TOKENIZER_CONFIG), *_settings(
        f"run.out_dir={out}", f"images.paths=[{os.path.join(data.directory, 'train')}]",
        f"tokenizer.tower.hf_path={os.path.join(teacher.directory, 'tower')}",
        f"tokenizer_train.steps={plan.tokenizer_steps}")]
    run_deepspeed(RANKS, args, timeout=STAGE_TIMEOUT_S, log_path=os.path.join(out, "launch.log"), echo=True)
    records = _metrics(out)
    plot_losses(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"),
                ("loss", "pixel_mse", "semantic_mse", "commit_pixel"))
    tail = records[-max(1, len(records) // 10):]
    return {
        "ranks": RANKS,
        "steps": len(records),
        "first_loss": records[0]["loss"],
        "last_loss": _mean(tail, "loss"),
        "train_psnr": _mean(tail, "psnr"),
        "usage_pixel": records[-1]["usage_pixel"],
        "usage_semantic": records[-1]["usage_semantic"],
        "images_per_s": sum(r["images"] for r in records) / sum(r["step_time"] for r in records),
    }


def extract_tokens(out: str, data: StageRecord, tokenizer: StageRecord) -> dict:
    started = time.perf_counter()
    run_command(megadual_command([
        "extract", "--input", os.path.join(data.directory, "train"), "--out", os.path.join(out, "tokens"),
        "--tokenizer", os.path.join(tokenizer.directory, "tokenizer"), "--num-workers", "1"]),
        timeout=STAGE_TIMEOUT_S, log_path=os.path.join(out, "extract.log"), echo=True)
    seconds = time.perf_counter() - started
    with open(os.path.join(out, "tokens", "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    samples = manifest["num_samples"]
    return {"samples": samples, "skipped": len(manifest.get("skipped", [])),
            "images_per_s_with_startup": samples / seconds}


def train_mllm(out: str, tokens: StageRecord, tokenizer: StageRecord, plan: DemoPlan) -> dict:
    args = ["train", "--config", repo_path(MLLM_CONFIG), *_settings(
        *MLLM_LAYOUT, f"run.out_dir={out}", f"loader.paths=[{os.path.join(tokens.directory, 'tokens')}]",
        f"mllm.tokenizer_path={os.path.join(tokenizer.directory, 'tokenizer')}", "mllm.code_init=tokenizer",
        f"train.steps={plan.mllm_steps}", f"train.save_every={_save_every(plan)}")]
    run_deepspeed(RANKS, args, timeout=STAGE_TIMEOUT_S, log_path=os.path.join(out, "launch.log"), echo=True)
    records = _metrics(out)
    head, tail = records[: max(1, len(records) // 10)], records[-max(1, len(records) // 10):]
    return {
        "ranks": RANKS,
        "layout": "data parallel x2, ZeRO-1",
        "steps": len(records),
        "first_loss": _mean(head, "loss"),
        "last_loss": _mean(tail, "loss"),
        "last_text_loss": _mean(tail, "text_loss"),
        "last_visual_loss": _mean(tail, "visual_loss"),
        "tokens_per_s": sum(r["tokens"] for r in records) / sum(r["step_time"] for r in records),
    }


def _save_every(plan: DemoPlan) -> int:
    """Checkpoint spacing that gives the learning curve its points (the last at the final step)."""
    return max(1, plan.mllm_steps // plan.curve_points)


def export_hf(out: str, mllm: StageRecord) -> dict:
    hf = os.path.join(out, "hf")
    run_command(megadual_command(["convert", "to-hf", "--src", mllm.directory, "--out", hf]),
                timeout=STAGE_TIMEOUT_S, log_path=os.path.join(out, "convert.log"), echo=True)
    files = sorted(os.path.relpath(os.path.join(d, f), hf) for d, _, fs in os.walk(hf) for f in fs)
    return {"files": files, "bytes": sum(os.path.getsize(os.path.join(hf, f)) for f in files)}


def evaluate(out: str, data: StageRecord, hf: StageRecord) -> dict:
    torch.manual_seed(0)
    held_out = load_scene_shards(os.path.join(data.directory, "held_out"))
    loaded = load_for_inference(os.path.join(hf.directory, "hf"), device="cpu")

    started = time.perf_counter()
    recon = reconstruction_quality(loaded.visual, held_out.images)
    recon_s = time.perf_counter() - started
    reconstructions = to_pil(recon.reconstructions)
    recon_read = read_back(reconstructions, held_out)
    save_judged_grid(list(zip(held_out.images, reconstructions)), [j.correct for j in recon_read.items],
                     os.path.join(out, "reconstructions.png"))
    reader = read_back(held_out.images, held_out)
    started = time.perf_counter()
    generation, images = judge_generation(loaded, held_out)
    generation_s = time.perf_counter() - started
    save_judged_grid([(image,) for image in images], [j.correct for j in generation.items],
                     os.path.join(out, "generations.png"))
    started = time.perf_counter()
    captions = judge_captions(loaded, held_out)
    caption_s = time.perf_counter() - started

    with open(os.path.join(out, "judged.json"), "w", encoding="utf-8") as f:
        json.dump({"generation": [asdict(j) for j in generation.items],
                   "captions": [asdict(j) for j in captions.items]}, f, indent=1)
    n = len(held_out.images)
    return {
        "held_out": n,
        "psnr": recon.psnr,
        "ssim": recon.ssim,
        "reader": reader.summary(),
        "reconstruction_read": recon_read.summary(),
        "generation": generation.summary(),
        "caption": captions.summary(),
        "reconstruct_images_per_s": n / recon_s,
        "generate_images_per_s": n / generation_s,
        "caption_images_per_s": n / caption_s,
        "caption_samples": [(j.expected["caption"], j.seen["caption"]) for j in captions.items[:8]],
        "generation_samples": [(j.expected["caption"], j.seen, j.correct) for j in generation.items[:8]],
    }


def probe(out: str, data: StageRecord, tokens: StageRecord, tokenizer: StageRecord, plan: DemoPlan) -> dict:
    """What the codes carry (probe.py): probes trained on the token shards, scored on the held-out codes."""
    visual = DualTokenizer.from_pretrained(os.path.join(tokenizer.directory, "tokenizer"))
    train = read_token_codes(os.path.join(tokens.directory, "tokens"), limit=PROBE_TRAIN_CODES)
    held_out = load_scene_shards(os.path.join(data.directory, "held_out"))
    test = encode_code_set(visual, held_out.images, held_out.labels)
    return {"probe": probe_codes(visual, train, test, steps=plan.probe_steps), "chance": chance_levels(),
            "train_samples": len(train), "held_out": len(test)}


def learning_curve(out: str, data: StageRecord, mllm: StageRecord) -> dict:
    """Held-out captioning and generation at the unified model's intermediate checkpoints
    (the last one is the evaluate stage's export)."""
    held_out = load_scene_shards(os.path.join(data.directory, "held_out"))
    points = []
    for step in tqdm(checkpoint_steps(mllm.directory)[:-1], desc="learning curve", unit="checkpoint"):
        torch.manual_seed(0)
        loaded = load_for_inference(mllm.directory, tag=step_tag(step), device="cpu")
        generation, _ = judge_generation(loaded, held_out)
        points.append({"step": step, "caption": judge_captions(loaded, held_out).summary(),
                       "generation": generation.summary()})
    return {"points": points}


def run_demo(out_dir: str, quick: bool = False, force: bool = False) -> dict:
    """Run (or reuse) every stage, write OUT/report.md; returns the figures by stage name."""
    started = time.perf_counter()
    plan = QUICK if quick else FULL
    os.makedirs(out_dir, exist_ok=True)
    stages = StageRunner(out_dir, force=force)
    tok_cfg, mllm_cfg = (_read(repo_path(p)) for p in (TOKENIZER_CONFIG, MLLM_CONFIG))
    # Each stage is keyed by its own settings only: more unified-model steps must not redo the data.
    data = stages.run("data", "synthetic shapes: training and held-out images",
                      {"train_images": plan.train_images, "held_out_images": plan.held_out_images,
                       "world": _world_fingerprint()}, [],
                      lambda d: make_data(d, plan))
    teacher = stages.run("teacher", "semantic teacher: a SigLIP tower pre-trained on the captions",
                         {**asdict(TeacherPlan(steps=plan.teacher_steps)), "config": tok_cfg}, [data],
                         lambda d: pretrain_teacher(d, data, plan))
    tokenizer = stages.run("tokenizer", f"DualToken tokenizer, {RANKS} ranks (deepspeed)",
                           {"steps": plan.tokenizer_steps, "config": tok_cfg}, [data, teacher],
                           lambda d: train_tokenizer(d, data, teacher, plan))
    tokens = stages.run("tokens", "offline token extraction", {}, [data, tokenizer],
                        lambda d: extract_tokens(d, data, tokenizer))
    stages.run("probe", "probes: what the codes carry", {"steps": plan.probe_steps}, [data, tokens, tokenizer],
               lambda d: probe(d, data, tokens, tokenizer, plan))
    mllm = stages.run("mllm", f"unified model, {RANKS} ranks (deepspeed)",
                      {"steps": plan.mllm_steps, "save_every": _save_every(plan), "config": mllm_cfg,
                       "layout": MLLM_LAYOUT}, [tokens, tokenizer],
                      lambda d: train_mllm(d, tokens, tokenizer, plan))
    hf = stages.run("hf", "conversion to Hugging Face format", {}, [mllm], lambda d: export_hf(d, mllm))
    stages.run("evaluate", "held-out generation, captioning and reconstruction", {}, [data, hf],
               lambda d: evaluate(d, data, hf))
    stages.run("curve", "learning curve: held-out scores at earlier checkpoints", {}, [data, mllm],
               lambda d: learning_curve(d, data, mllm))
    report = write_report(out_dir, stages.records, quick, time.perf_counter() - started)
    return {"report": report, **{r.name: r.figures for r in stages.records},
            "reused": [r.name for r in stages.records if r.reused]}


def main(args) -> int:
    """`megadual demo`: run the embedded end-to-end job and print the report."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    figures = run_demo(args.out, quick=args.quick, force=args.force)
    print(open(figures["report"], encoding="utf-8").read())
    print(f"report: {figures['report']}")
    return 0
