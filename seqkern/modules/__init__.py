"""Drop-in nn.Modules with upstream names, constructor signatures and state_dict keys."""

from seqkern.modules.sequence import SequenceIdentity, SequenceModule, TransposedModule

__all__ = ["SequenceModule", "TransposedModule", "SequenceIdentity"]
