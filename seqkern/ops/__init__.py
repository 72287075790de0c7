"""seqkern ops: each a torch.library custom op with a fake, one autograd.Function and a public
function that runs on whichever backend `seqkern.backends` selects."""

from seqkern.ops.adaln import AdalnFunction, adaln

__all__ = ["adaln", "AdalnFunction"]
