"""Knowledge-distillation losses: one engine (:mod:`kdtune.losses.engine`) behind the chunked
family (torchtune's names), the fused loss and sparse (top-k) teachers.

``isinstance(module, KDLoss)`` tells a kdtune loss. A new divergence is one per-token function
registered with :func:`register_divergence` (autograd gives its gradient, chunk by chunk).
"""

from kdtune.losses._math import TopKTeacher
from kdtune.losses.base import KDLoss
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
from kdtune.losses.divergences import (
    DIVERGENCES,
    Divergence,
    get_divergence,
    register_divergence,
)
from kdtune.losses.engine import KDOutput
from kdtune.losses.fused import FusedKDOutput, FusedLinearKDLoss, fused_linear_kd_loss

__all__ = [
    "DIVERGENCES",
    "CEWithChunkedOutputLoss",
    "ChunkedKDLoss",
    "Divergence",
    "ForwardKLLoss",
    "ForwardKLWithChunkedOutputLoss",
    "FusedKDOutput",
    "FusedLinearKDLoss",
    "JSDWithChunkedOutputLoss",
    "KDLoss",
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
    "register_divergence",
    "reverse_kl_loss",
    "skew_forward_kl_loss",
    "skew_reverse_kl_loss",
    "symmetric_kl_loss",
    "tvd_loss",
]
