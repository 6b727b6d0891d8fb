"""The DualToken generator objective, composed from the loss terms of megadual.losses.

Shapes: images [B, 3, H, W] in [-1, 1]; tower features [B, T, C]; pooled [B, C].

    total = w_pix * MSE + w_lpips * LPIPS                                  (the "nll")
          + w_sem * [(MSE + 1 - cos)(semantic layer) + (MSE + 1 - cos)(pooler)]
          + w_commit * (commit_pixel + commit_semantic)
          + w_gan * adaptive * hinge_G          (from discriminator.start_step on)

The adaptive weight needs the gradients of the nll and of hinge_G at the decoder's last conv
weight before the real backward. DeepSpeed forbids any backward through its engine's outputs
other than `engine.backward`, so the image terms are evaluated on a detached copy of the
reconstruction: their gradients at the reconstruction (one small backward through LPIPS and
the frozen discriminator) give the last-layer gradients in closed form (a conv weight
gradient), and the engine's backward then receives `sum(reconstruction * grad)`, a surrogate
with exactly the same gradient as the image terms.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megadual.config.schema import TokenizerLossConfig
from megadual.losses import adaptive_weight, feature_cosine, hinge_g_loss, psnr, semantic_loss
from megadual.models.vision.decoder import PixelDecoder
from megadual.models.vision.tokenizer import TokenizerOutput


def generator_loss(
    out: TokenizerOutput,
    images: torch.Tensor,
    teacher_semantic: torch.Tensor,
    teacher_pooled: torch.Tensor,
    cfg: TokenizerLossConfig,
    decoder: PixelDecoder,
    perceptual: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    fake_logits_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generator's objective, ready for `engine.backward`, and its parts.

    Args:
        out: the tokenizer's training output.
        images: the inputs (reconstruction targets).
        teacher_semantic, teacher_pooled: the frozen initial tower's features.
        cfg: weights and the adaptive-weight clamp.
        decoder: the pixel decoder (for last-layer gradients).
        perceptual: LPIPS (None: the term is 0).
        fake_logits_fn: the discriminator applied as a constant function (None: no GAN term yet).

    Returns:
        (objective [] whose gradient is the total loss's gradient, metrics: name -> detached []
        float32 tensor; metrics["loss"] is the total loss's value).
    """
    rec = out.reconstruction.detach().float().requires_grad_()
    pixel_mse = F.mse_loss(rec, images.float())
    lpips = perceptual(rec, images) if perceptual is not None and cfg.lpips_weight > 0 else rec.new_zeros(())
    nll = cfg.pixel_mse_weight * pixel_mse + cfg.lpips_weight * lpips
    (rec_grad,) = torch.autograd.grad(nll, rec)
    gan_g = weight = rec.new_zeros(())
    if fake_logits_fn is not None and cfg.gan_weight > 0:
        gan_g = hinge_g_loss(fake_logits_fn(rec))
        (g_grad,) = torch.autograd.grad(gan_g, rec)
        features = out.decoder_features.detach()
        weight = adaptive_weight(decoder.last_layer_grad(features, rec_grad), decoder.last_layer_grad(features, g_grad),
                                 cfg.adaptive_weight_min, cfg.adaptive_weight_max)
        rec_grad = rec_grad + cfg.gan_weight * weight * g_grad
    image_terms = (out.reconstruction.float() * rec_grad).sum()  # gradient = the image terms' gradient

    sem_layer, sem_mse, sem_cos = semantic_loss(out.semantic.features, teacher_semantic)
    sem_pool, pool_mse, pool_cos = semantic_loss(out.pooled, teacher_pooled)
    commit_pixel, commit_semantic = out.pixel.commitment_loss, out.semantic.commitment_loss
    rest = cfg.semantic_weight * (sem_layer + sem_pool) + cfg.commitment_weight * (commit_pixel + commit_semantic)
    total = nll.detach() + cfg.gan_weight * weight * gan_g.detach() + rest.detach()
    metrics = {
        "loss": total,
        "pixel_mse": pixel_mse.detach(),
        "lpips": lpips.detach(),
        "semantic_mse": sem_mse.detach(),
        "semantic_cos": sem_cos.detach(),
        "pooled_mse": pool_mse.detach(),
        "pooled_cos": pool_cos.detach(),
        "tower_cos": feature_cosine(out.semantic_unquantized.detach(), teacher_semantic),
        "commit_pixel": commit_pixel.detach(),
        "commit_semantic": commit_semantic.detach(),
        "gan_g": gan_g.detach(),
        "adaptive_weight": weight.detach(),
        "psnr": psnr(rec, images),
    }
    return image_terms + rest, metrics
