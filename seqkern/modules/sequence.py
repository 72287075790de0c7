"""The `espnet2.asr.state_spaces.base.SequenceModule` interface.

A SequenceModule maps (B, L, d_model) to (B, L, d_output) with an optional recurrent state:

    y, state = module(x, state)            # whole sequence
    y_t, state = module.step(x_t, state)   # one step, x_t (B, d_model)

seqkern modules with a recurrent path implement it, and stepping through a sequence equals the
forward on the whole of it (tests/modules).
"""

from __future__ import annotations

import functools

from torch import nn


class SequenceModule(nn.Module):
    """Abstract sequence-to-sequence module with a recurrent interface (no parameters).

    Subclasses set `d_model` and `d_output`, and implement `forward`, and where they have a
    recurrent path `default_state`, `step` and `state_to_tensor`/`d_state`.
    """

    # TorchScript compiles a module's properties; these are Python-side metadata (one returns
    # a lambda), so a scripted subclass leaves them out.
    __jit_unused_properties__ = ["d_model", "d_output", "state_to_tensor", "d_state"]

    @property
    def d_model(self) -> int:
        if getattr(self, "_d_model", None) is None:
            raise NotImplementedError("SequenceModule instantiation must set d_model")
        return self._d_model

    @d_model.setter
    def d_model(self, d: int) -> None:
        self._d_model = d

    @property
    def d_output(self) -> int:
        if getattr(self, "_d_output", None) is None:
            raise NotImplementedError("SequenceModule instantiation must specify d_output")
        return self._d_output

    @d_output.setter
    def d_output(self, d: int) -> None:
        self._d_output = d

    def forward(self, x, state=None, **kwargs):
        """(B, L, d_model) -> ((B, L, d_output), next_state). The base is the identity."""
        return x, None

    @property
    def state_to_tensor(self):
        """A function mapping a state to a single tensor (or None)."""
        return lambda _: None

    @property
    def d_state(self):
        """Size of `state_to_tensor`'s output (None when there is no state)."""
        return None

    def default_state(self, *batch_shape, device=None):
        """The initial recurrent state for `batch_shape` (None when stateless)."""
        return None

    def step(self, x, state=None, **kwargs):
        """One recurrent step: (B, d_model) -> ((B, d_output), next_state)."""
        raise NotImplementedError


def TransposedModule(module: type) -> type:  # noqa: N802 - upstream's name
    """Class decorator adding a `transposed` flag: input (B, d_model, L) instead of (B, L, d).

    As upstream: the wrapped forward is called positionally as forward(x, state) (other keyword
    arguments are dropped), and the returned state is None whenever the incoming one was.
    """

    class Transposed(module):
        def __init__(self, *args, transposed: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.transposed = transposed

        def forward(self, x, state=None, **kwargs):
            if self.transposed:
                x = x.transpose(-1, -2)
            x, next_state = super().forward(x, state)
            next_state = None if state is None else next_state
            if self.transposed:
                x = x.transpose(-1, -2)
            return x, next_state

    functools.update_wrapper(Transposed, module, updated=())
    return Transposed


@TransposedModule
class SequenceIdentity(SequenceModule):
    """Identity SequenceModule, for testing: returns (x, state)."""

    def __init__(self, d_model: int, dropout: float = 0.0, **kwargs):
        super().__init__()
        self.d_model = d_model
        self.d_output = d_model

    def forward(self, x, state=None):
        return x, state
