"""Plain-PyTorch references: the oracle every accelerated backend is tested against.

Nothing here imports triton, seqkern._C or any other accelerated code.
"""

from seqkern.reference.adaln import adaln_bwd_ref, adaln_fwd_ref, adaln_ref

__all__ = ["adaln_ref", "adaln_fwd_ref", "adaln_bwd_ref"]
