"""seqkern: fast, verified kernels for speech sequence models.

    import seqkern
    y = seqkern.adaln(x, gamma, beta)           # picks cuda / triton / cpu / reference
    with seqkern.use_backend("triton", "cpu"):  # or SEQKERN_BACKEND=triton,cpu
        y = seqkern.adaln(x, gamma, beta)       # raises BackendError instead of falling back

`import seqkern` never fails: without seqkern._C or triton, the missing backends are reported
by `seqkern info` (or `seqkern.info()`), not raised.
"""

from seqkern import modules
from seqkern.backends import BackendError, use_backend
from seqkern.ops import adaln
from seqkern.reference import adaln_ref
from seqkern.swap import swap, unswap

__version__ = "0.1.0"


def info() -> str:
    """The `seqkern info` report as text: versions, build, GPU, op x backend availability."""
    from seqkern.info import report

    return report()


__all__ = [
    "adaln",
    "adaln_ref",
    "modules",
    "swap",
    "unswap",
    "use_backend",
    "BackendError",
    "info",
    "__version__",
]
