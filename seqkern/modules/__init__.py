"""Drop-in nn.Modules with upstream names, constructor signatures and state_dict keys."""

from seqkern.modules.beats import BeatsMultiheadAttention
from seqkern.modules.emformer import ConvEmformer, Emformer
from seqkern.modules.mega import MEGADecoder
from seqkern.modules.sequence import SequenceIdentity, SequenceModule, TransposedModule
from seqkern.modules.valle import ValleNARDecoder

__all__ = [
    "BeatsMultiheadAttention",
    "ConvEmformer",
    "Emformer",
    "MEGADecoder",
    "SequenceIdentity",
    "SequenceModule",
    "TransposedModule",
    "ValleNARDecoder",
]
