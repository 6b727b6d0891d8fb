"""Vision side of the DualToken tokenizer: residual quantizer (EMA codebooks, dead-code restart)."""

from megadual.models.vision.quantizer import ResidualQuantizer, RQOutput, RQUsage

__all__ = ["RQOutput", "RQUsage", "ResidualQuantizer"]
