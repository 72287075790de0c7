"""seqkern: fast, verified kernels for speech sequence models.

    import seqkern
    y = seqkern.adaln(x, gamma, beta)           # picks cuda / triton / cpu / reference
    y = seqkern.ema(x, damping, decay, expansion, projection, omega=omega)
    o = seqkern.attention(q, k, v, causal=True)  # also chunk_attention, relbias_attention, ...
    with seqkern.use_backend("triton", "cpu"):  # or SEQKERN_BACKEND=triton,cpu
        y = seqkern.adaln(x, gamma, beta)       # raises BackendError instead of falling back

`import seqkern` never fails: without seqkern._C or triton, the missing backends are reported
by `seqkern info` (or `seqkern.info()`), not raised.
"""

from seqkern import modules
from seqkern.backends import BackendError, use_backend
from seqkern.ops.adaln import adaln
from seqkern.ops.attention import attention, attention_packed
from seqkern.ops.chunk import chunk_attention
from seqkern.ops.ema import ema, ema_step
from seqkern.ops.emformer import emformer_attention, emformer_segment_attention
from seqkern.ops.emformer_conv import emformer_segment_conv
from seqkern.ops.linear import linear_rows
from seqkern.ops.relbias import relbias_attention
from seqkern.reference import adaln_ref
from seqkern.swap import swap, unswap

__version__ = "0.1.0"


def info() -> str:
    """The `seqkern info` report as text: versions, build, GPU, op x backend availability."""
    from seqkern.info import report

    return report()


__all__ = [
    "adaln",
    "attention",
    "attention_packed",
    "chunk_attention",
    "ema",
    "ema_step",
    "emformer_attention",
    "emformer_segment_attention",
    "emformer_segment_conv",
    "linear_rows",
    "relbias_attention",
    "adaln_ref",
    "modules",
    "swap",
    "unswap",
    "use_backend",
    "BackendError",
    "info",
    "__version__",
]
