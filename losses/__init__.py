"""Knowledge-distillation losses: per-token divergences, the chunked family and the fused loss."""

from kdtune.losses.chunked import (
    CEWithChunkedOutputLoss,
    ChunkedKDLoss,
    ForwardKLWithChunkedOutputLoss,
    JSDWithChunkedOutputLoss,
    ReverseKLWithChunkedOutputLoss,
    SkewForwardKLWithChunkedOutputLoss,
    SkewReverseKLWithChunkedOutputLoss,
    SymmetricKLWithChunkedOutputLoss,
    TVDWithChunkedOutputLoss,
    ce_loss,
    forward_kl_loss,
    jsd_loss,
    kd_loss,
    reverse_kl_loss,
    skew_forward_kl_loss,
    skew_reverse_kl_loss,
    symmetric_kl_loss,
    tvd_loss,
)
from kdtune.losses.divergences import DIVERGENCES, get_divergence
from kdtune.losses.fused import FusedKDOutput, FusedLinearKDLoss

__all__ = [
    "DIVERGENCES",
    "CEWithChunkedOutputLoss",
    "ChunkedKDLoss",
    "ForwardKLWithChunkedOutputLoss",
    "FusedKDOutput",
    "FusedLinearKDLoss",
    "JSDWithChunkedOutputLoss",
    "ReverseKLWithChunkedOutputLoss",
    "SkewForwardKLWithChunkedOutputLoss",
    "SkewReverseKLWithChunkedOutputLoss",
    "SymmetricKLWithChunkedOutputLoss",
    "TVDWithChunkedOutputLoss",
    "ce_loss",
    "forward_kl_loss",
    "get_divergence",
    "jsd_loss",
    "kd_loss",
    "reverse_kl_loss",
    "skew_forward_kl_loss",
    "skew_reverse_kl_loss",
    "symmetric_kl_loss",
    "tvd_loss",
]
