"""Knowledge-distillation losses: one engine (:mod:`kdtune.losses.engine`) behind the chunked
family (torchtune's names), the fused loss and sparse (top-k) teachers."""

from kdtune.losses._math import TopKTeacher
from kdtune.losses.chunked import (
    CEWithChunkedOutputLoss,
    ChunkedKDLoss,
    ForwardKLLoss,
    ForwardKLWithChunkedOutputLoss,
    JSDWithChunkedOutputLoss,
    ReverseKLLoss,
    ReverseKLWithChunkedOutputLoss,
    SkewForwardKLWithChunkedOutputLoss,
    SkewReverseKLWithChunkedOutputLoss,
    SymmetricKLLoss,
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
from kdtune.losses.engine import KDOutput
from kdtune.losses.fused import FusedKDOutput, FusedLinearKDLoss, fused_linear_kd_loss

__all__ = [
    "DIVERGENCES",
    "CEWithChunkedOutputLoss",
    "ChunkedKDLoss",
    "ForwardKLLoss",
    "ForwardKLWithChunkedOutputLoss",
    "FusedKDOutput",
    "FusedLinearKDLoss",
    "JSDWithChunkedOutputLoss",
    "KDOutput",
    "ReverseKLLoss",
    "ReverseKLWithChunkedOutputLoss",
    "SkewForwardKLWithChunkedOutputLoss",
    "SkewReverseKLWithChunkedOutputLoss",
    "SymmetricKLLoss",
    "SymmetricKLWithChunkedOutputLoss",
    "TVDWithChunkedOutputLoss",
    "TopKTeacher",
    "ce_loss",
    "forward_kl_loss",
    "fused_linear_kd_loss",
    "get_divergence",
    "jsd_loss",
    "kd_loss",
    "reverse_kl_loss",
    "skew_forward_kl_loss",
    "skew_reverse_kl_loss",
    "symmetric_kl_loss",
    "tvd_loss",
]
