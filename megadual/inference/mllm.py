"""Text-to-image generation and captioning with a trained unified model (`megadual generate` /
`megadual caption`).

Legend: B batch, P visual positions, R residual depth, H x W image size.

A checkpoint is either a stage-2 run directory (`megadual train`): its config.yaml names the
visual tokenizer (`mllm.tokenizer_path`, a `DualTokenizer.save_pretrained` directory) and the
text tokenizer (`mllm.text_tokenizer`); the weights are the newest complete checkpoint,
read whole (tp = pp = 1, any ZeRO stage); or an export directory (`megadual convert to-hf`
of such a run, any layout; megadual/models/mllm_export.py), which carries both tokenizers.
Both run on CPU or GPU, batched.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from megadual.config import Config, load_config
from megadual.config.errors import ConfigError
from megadual.data.text_tokenizers import TextTokenizer, load_text_tokenizer
from megadual.models.mllm import DualTokenMLLM
from megadual.models.mllm_export import is_mllm_export
from megadual.models.vision.tokenizer import DualTokenizer
from megadual.train.checkpoint import load_model_state

logger = logging.getLogger(__name__)


@dataclass
class LoadedMLLM:
    cfg: Config
    model: DualTokenMLLM
    visual: DualTokenizer
    text: TextTokenizer
    device: torch.device


def _inference_device(device: Optional[str]) -> torch.device:
    """--device as a torch device (default: CUDA when present), refused in plain words when
    this torch cannot use it."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device torch knows ({_first_line(e)}); use cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch has no usable CUDA (torch.cuda.is_available() is False); "
                         "use --device cpu")
    return dev


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def open_image(path: str) -> Image.Image:
    """The RGB image at `path`, decoded now, so a bad file is named before any model loads.

    Raises:
        FileNotFoundError: no such file; IsADirectoryError: a directory;
        ValueError: not an image, or a truncated / corrupt one.
    """
    if os.path.isdir(path):
        raise IsADirectoryError(f"image {path} is a directory; pass image files")
    if not os.path.exists(path):
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"image {path} cannot be decoded ({_first_line(e)})") from e


def load_for_inference(ckpt: str, tag: Optional[str] = None, device: Optional[str] = None) -> LoadedMLLM:
    """Model, visual tokenizer and text tokenizer of a stage-2 run directory or of an export
    directory (`megadual convert to-hf`; `tag` does not apply to it).

    Raises:
        FileNotFoundError: neither a run (no config.yaml) nor an export (no MegaDual
            config.json); no checkpoint / tokenizer directory.
        ConfigError: the run or export names no visual tokenizer.
    """
    dev = _inference_device(device)
    if is_mllm_export(ckpt):
        if tag is not None:
            raise ValueError(f"{ckpt} is an export directory (one set of weights); tag={tag!r} applies to run directories")
        model = DualTokenMLLM.from_pretrained(ckpt)
        cfg = Config(backbone=model.backbone_cfg, mllm=model.cfg)
        missing = (f"{ckpt} is an export without a visual tokenizer (no visual_tokenizer/); re-export it with "
                   "`megadual convert to-hf --visual-tokenizer DIR`")
    else:
        config_path = os.path.join(ckpt, "config.yaml")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(
                f"{ckpt} is neither a stage-2 run directory (no config.yaml) nor an export directory "
                "(no config.json with a 'megadual' section)"
            )
        cfg = load_config(config_path)
        cfg.require("backbone", "mllm", command="generate/caption")
        model = DualTokenMLLM(cfg.backbone, cfg.mllm)
        model.load_state_dict(load_model_state(ckpt, tag))
        missing = None
    if not cfg.mllm.tokenizer_path:
        raise ConfigError("mllm.tokenizer_path", None, "the DualToken tokenizer directory the run's codes come from",
                          message=missing)
    visual = DualTokenizer.from_pretrained(cfg.mllm.tokenizer_path)
    return LoadedMLLM(cfg, model.to(dev).eval(), visual.to(dev).eval(), load_text_tokenizer(cfg.mllm.text_tokenizer), dev)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL RGB images."""
    array = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in array]


def from_pil(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> [B, 3, size, size] in [-1, 1] (resize shorter side, center crop)."""
    out = []
    for image in images:
        image = image.convert("RGB")
        scale = size / min(image.size)
        w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)


@torch.no_grad()
def generate_images(loaded: LoadedMLLM, prompts: list[str], cfg_scale: Optional[float] = None,
                    temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                    seed: int = 0) -> list[Image.Image]:
    """One image per prompt: codes sampled depth by depth with classifier-free guidance, decoded
    by the visual tokenizer's pixel decoder."""
    generator = torch.Generator(device=loaded.device).manual_seed(seed)
    ids = [loaded.text.encode(p) for p in prompts]
    pixel, _ = loaded.model.generate_image_codes(ids, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                                                 top_p=top_p, generator=generator)
    return to_pil(loaded.visual.decode(pixel))  # [B, P, R] -> [B, 3, H, W]


@torch.no_grad()
def caption_images(loaded: LoadedMLLM, images: list[Image.Image], max_new_tokens: int = 64,
                   temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Captions: [image_start] codes [image_end] then text, greedy at temperature 0."""
    pixels = from_pil(images, loaded.visual.image_size).to(loaded.device)
    pixel_codes, semantic_codes = loaded.visual.encode(pixels)  # [B, P, R] each
    b, p, r = pixel_codes.shape
    ids, mask = loaded.model.understanding_prefix(b, p)
    ids, mask = ids.to(loaded.device), mask.to(loaded.device)
    full = lambda codes: torch.zeros((*ids.shape, r), dtype=torch.long, device=loaded.device).index_put_(  # noqa: E731
        (mask,), codes.reshape(-1, r))
    generator = torch.Generator(device=loaded.device).manual_seed(seed)
    new = loaded.model.generate_text(ids, max_new_tokens, full(pixel_codes), full(semantic_codes), mask,
                                     temperature=temperature, generator=generator)
    eos = loaded.cfg.mllm.tokens.eos_id
    texts = []
    for row in new.tolist():
        row = row[: row.index(eos)] if eos in row else row
        texts.append(loaded.text.decode(row).strip())
    return texts


def generate_main(args) -> int:
    """`megadual generate`: one PNG per --prompt (OUT, or OUT_i.png for several)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    loaded = load_for_inference(args.ckpt, device=args.device)
    images = generate_images(loaded, args.prompt, args.cfg, args.temperature, args.top_k, args.top_p, args.seed)
    root, ext = os.path.splitext(args.out)
    for i, image in enumerate(images):
        path = args.out if len(images) == 1 else f"{root}_{i}{ext or '.png'}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        image.save(path)
        print(path)
    return 0


def caption_main(args) -> int:
    """`megadual caption`: one line per --image."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    images = [open_image(path) for path in args.image]
    loaded = load_for_inference(args.ckpt, device=args.device)
    for path, text in zip(args.image, caption_images(loaded, images, args.max_new_tokens, args.temperature, args.seed)):
        print(f"{path}\t{text}")
    return 0
