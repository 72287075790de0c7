"""Defines seqkern's ops in the `seqkern::` torch.library namespace.

Each op is a schema, one Python implementation that asks `seqkern.backends` which kernel to run,
and a fake (meta) implementation for torch.compile and export. We use the low-level
`torch.library.Library` API rather than `torch.library.custom_op`: the schema, the fake, opcheck
and torch.compile behave the same, but a call costs about 2 us of dispatch instead of 10-20 us,
which matters for the step-by-step decoding paths. What custom_op would also check at run time
(no output aliases an input) is checked by `torch.library.opcheck` in the tests instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LIB = torch.library.Library("seqkern", "DEF")


def is_number(x) -> bool:
    """A real scalar argument (scale, dropout_p, ...): an int or float, or its symbolic form
    under torch.compile (a float argument may be traced as a SymFloat); not a bool."""
    return isinstance(x, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(x, bool)


def define_op(name: str, schema: str, impl: Callable, fake: Callable):
    """Define `seqkern::<name><schema>` with a backend-dispatching `impl` and a `fake`.

    The op has no autograd formula of its own: each op's autograd.Function calls the forward
    and backward ops with grad mode off.
    """
    _LIB.define(name + schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"seqkern::{name}", fake, lib=_LIB)
    return getattr(torch.ops.seqkern, name)
