"""The compat tests prove the *reference* against upstream, so every test here runs with only
the reference backend allowed (kernels are proven against the reference in tests/ops and
tests/modules). The upstream fixtures (`espnet_upstream`, `torchaudio_upstream`) live in
tests/conftest.py, shared by the compat, module and swap tests."""

import pytest

from seqkern import backends


@pytest.fixture(autouse=True)
def _reference_backend_only():
    with backends.use_backend("reference"):
        yield
