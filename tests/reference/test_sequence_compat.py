"""seqkern.modules.SequenceModule against espnet2.asr.state_spaces.base (the real module)."""

import pytest
import torch

from seqkern.modules.sequence import SequenceIdentity, SequenceModule, TransposedModule


def test_properties_and_defaults_match_upstream(espnet_upstream):
    base = espnet_upstream.state_spaces_base
    for cls in (base.SequenceModule, SequenceModule):
        m = cls()
        with pytest.raises(NotImplementedError):
            _ = m.d_model
        with pytest.raises(NotImplementedError):
            _ = m.d_output
        m.d_model, m.d_output = 5, 7
        assert (m.d_model, m.d_output) == (5, 7)
        assert m.d_state is None and m.state_to_tensor("anything") is None
        assert m.default_state(2, 3) is None
        x = torch.randn(2, 4, 5)
        y, state = m(x)
        assert y is x and state is None
        with pytest.raises(NotImplementedError):
            m.step(x[:, 0])
        assert list(m.state_dict()) == [] and list(m.parameters()) == []


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("state", [None, "s"])
def test_transposed_identity_matches_upstream(espnet_upstream, transposed, state):
    base = espnet_upstream.state_spaces_base
    up = base.SequenceIdentity(6, transposed=transposed)
    ours = SequenceIdentity(6, transposed=transposed)
    x = torch.randn(2, 6, 9) if transposed else torch.randn(2, 9, 6)
    (y0, s0), (y1, s1) = up(x, state), ours(x, state)
    assert torch.equal(y0, y1) and s0 == s1
    assert (ours.d_model, ours.d_output) == (up.d_model, up.d_output)


def test_transposed_drops_kwargs_and_nulls_state_like_upstream():
    @TransposedModule
    class Doubler(SequenceModule):
        def __init__(self, d):
            super().__init__()
            self.d_model = self.d_output = d

        def forward(self, x, state=None, scale=1.0):
            return x * 2 * scale, "next"

    m = Doubler(3, transposed=True)
    x = torch.randn(1, 3, 4)
    y, s = m(x, None, scale=10.0)  # kwargs are not passed on, as upstream
    torch.testing.assert_close(y, x * 2)
    assert s is None  # no incoming state -> no state returned
    assert m(x, "prev")[1] == "next"
