"""Training losses and image metrics: GAN (hinge, adaptive weight), semantic distillation,
LPIPS (the `lpips` package, offline), PSNR / SSIM. Imports torch (and lpips lazily), never models."""

from .gan import adaptive_weight, hinge_d_loss, hinge_g_loss
from .metrics import psnr, ssim
from .semantic import feature_cosine, semantic_loss

__all__ = ["adaptive_weight", "feature_cosine", "hinge_d_loss", "hinge_g_loss", "psnr", "semantic_loss", "ssim"]
