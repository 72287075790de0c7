"""emformer_attention: the Triton segment-attention kernels against the float64 oracle.

The kernel reads the query/key/value streams where they lie and derives the mask from integer
arithmetic; the oracle (`emformer_attention_ref`) runs upstream's arithmetic on the concatenated
streams with the dense masks the module builds (`_EmformerBase._attention_mask` for training, the
infer mask of `EmformerAttention.infer`, `_key_padding_mask`'s rule for padding). Forward and the
gradient of every stream, fp32 and fp16, in the Triton interpreter (small shapes).
"""

import math
from types import SimpleNamespace

import pytest
import torch
from seqkern._triton import emformer_attention as E

from seqkern.modules.emformer import _EmformerBase, _key_padding_mask
from seqkern.reference.emformer import emformer_attention_ref
from seqkern.testing import assert_close_to_oracle


class Case:
    """A segment attention problem.

    mode "train": n = ceil(U / s) segments, memory n - 1 rows and summaries when M > 0.
    mode "infer": one chunk of U = s frames; state buffers of Mr memory and LCr lc rows,
    right-aligned, `past` frames seen before (None: no past_length, all rows valid).
    lengths: per batch element (utterance frames; B > 1 only), or None.
    layout: "contig" (a tensor per stream), "packed" (rc/utt rows of one (T, B, 3D) q|k|v
    buffer, memory/lc as column halves of (T, B, 2D) k|v buffers) or "bmajor" ((B, T, D)
    storage seen time-major).
    """

    def __init__(self, mode, B, H, hd, U, s, R, LC, M, lengths=None, layout="contig", **kw):
        self.mode, self.B, self.H, self.hd, self.U, self.s = mode, B, H, hd, U, s
        self.R, self.LC, self.M, self.lengths, self.layout = R, LC, M, lengths, layout
        self.Mr = kw.get("Mr", 0)
        self.LCr = kw.get("LCr", 0)
        self.past = kw.get("past")
        self.name = kw.get("name", "")

    def __repr__(self):
        tag = (
            f"{self.name}-{self.mode}-B{self.B}-hd{self.hd}-U{self.U}-s{self.s}-R{self.R}"
            f"-LC{self.LC}-M{self.M}-{self.layout}"
        )
        if self.mode == "infer":
            tag += f"-Mr{self.Mr}-LCr{self.LCr}-past{self.past}"
        return tag


CASES = [
    Case("train", 1, 2, 16, 13, 4, 2, 3, 2, layout="packed", name="ragged_U"),
    Case("train", 3, 2, 16, 14, 4, 1, 4, 1, lengths=[14, 9, 3], layout="bmajor", name="pad"),
    Case("train", 2, 2, 24, 12, 4, 2, 0, 3, lengths=[10, 5], name="pad_short_LC0"),
    Case("train", 2, 2, 16, 11, 4, 0, 4, 0, lengths=[11, 6], layout="packed", name="R0_M0"),
    Case("train", 1, 2, 32, 5, 8, 3, 2, 2, name="one_segment"),
    Case("train", 2, 2, 16, 21, 8, 8, 5, 2, lengths=[21, 13], layout="packed", name="two_tiles"),
    Case("train", 3, 2, 16, 12, 4, 0, 0, 0, lengths=[12, 3, 1], name="uniform"),
    Case("train", 2, 2, 16, 12, 4, 0, 0, 2, lengths=[12, 2], name="uniform_summary"),
    Case("infer", 1, 2, 16, 4, 4, 2, 3, 3, Mr=3, LCr=5, name="all_rows"),
    Case("infer", 2, 2, 16, 4, 4, 2, 8, 3, [4, 3], "packed", Mr=3, LCr=8, past=6, name="part"),
    Case("infer", 2, 2, 16, 4, 4, 0, 5, 2, [4, 0], Mr=2, LCr=5, past=0, name="none_valid"),
    Case("infer", 2, 2, 24, 6, 6, 1, 5, 3, [5, 3], "bmajor", Mr=3, LCr=5, past=40, name="full"),
    Case("infer", 1, 2, 16, 4, 4, 1, 0, 0, Mr=0, LCr=0, name="empty_state"),
    # A long reduction: dK/dV of a key sum over every query that sees it, at most ~60 above.
    # Memory row r is seen by the R + s rc and utterance rows of segments r+1 .. r+M, so with
    # M = 36 and R + s = 47, k_mem/v_mem row 0 sums 36 * 47 = 1692 queries (16-row tiles: 36
    # segments x 3 query tiles, accumulated one after the other). 4096 would take ~30 s per
    # dtype in the interpreter (the other streams' work grows with it); this takes ~10 s.
    Case("train", 1, 1, 16, 1628, 44, 3, 0, 36, name="long_dkdv_mem"),
]


def _rnd(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _streams(case, gen):
    """The eleven streams (float64, in the case's layout), rows as the module produces them."""
    B, D = case.B, case.H * case.hd
    U, R = case.U, case.R
    if case.mode == "train":
        n = math.ceil(U / case.s)
        Mr, LCr = (n - 1 if case.M > 0 else 0), None
    else:
        n, Mr, LCr = 1, case.Mr, case.LCr
    n_sum = n if case.M > 0 else 0

    def stream(rows):
        if case.layout == "bmajor":
            return _rnd(gen, B, rows, D).transpose(0, 1)
        return _rnd(gen, rows, B, D)

    def pair(rows):
        if case.layout == "packed":
            return _rnd(gen, rows, B, 2 * D).split(D, dim=2)
        return stream(rows), stream(rows)

    if case.layout == "packed":  # one q|k|v projection of [rc; utterance]
        q_rc, k_rc, v_rc = _rnd(gen, n * R + U, B, 3 * D)[: n * R].split(D, dim=2)
        q_utt, k_utt, v_utt = _rnd(gen, n * R + U, B, 3 * D)[n * R :].split(D, dim=2)
    else:
        q_rc, q_utt = stream(n * R), stream(U)
        k_rc, v_rc = pair(n * R)
        k_utt, v_utt = pair(U)
    k_mem, v_mem = pair(Mr)
    k_lc, v_lc = pair(LCr) if LCr is not None else (None, None)
    return dict(
        q_rc=q_rc,
        q_utt=q_utt,
        q_sum=stream(n_sum),
        k_mem=k_mem,
        k_rc=k_rc,
        k_lc=k_lc,
        k_utt=k_utt,
        v_mem=v_mem,
        v_rc=v_rc,
        v_lc=v_lc,
        v_utt=v_utt,
    )


def _valid_rows(case):
    """(valid memory rows, valid lc rows) of the right-aligned state."""
    if case.mode == "train":
        return None, None
    if case.past is None:
        return case.Mr, case.LCr
    return min(case.Mr, math.ceil(case.past / case.s)), min(case.LCr, case.past)


def _key_lengths(case, st):
    """(B,) int32 as the module computes them, or None (B = 1, or no lengths)."""
    if case.lengths is None or case.B == 1:
        return None
    lengths = torch.tensor(case.lengths)
    mv, lcv = _valid_rows(case)
    mems = st["k_mem"][st["k_mem"].shape[0] - mv :] if mv is not None else st["k_mem"]
    lc_rows = 0 if lcv is None else lcv
    kpm = _key_padding_mask(st["q_utt"], st["q_rc"], st["q_sum"], lengths, mems, lc_rows)
    key_lengths = lengths + mems.shape[0] + (st["q_rc"].shape[0] + case.U - lengths.max())
    key_lengths = (key_lengths + lc_rows).to(torch.int32)
    # the module's mask is exactly "key number >= key_lengths[b]"
    positions = torch.arange(kpm.shape[1])
    assert torch.equal(kpm, positions[None] >= key_lengths[:, None])
    return key_lengths


def _dense(case, st, key_lengths):
    """(q, k, v) concatenations and the dense (attention mask, key padding mask)."""
    mv, lcv = _valid_rows(case)
    mem = slice(st["k_mem"].shape[0] - (mv or 0), None) if mv is not None else slice(None)
    q = torch.cat([st["q_rc"], st["q_utt"], st["q_sum"]])
    ks = [st["k_mem"][mem], st["k_rc"]]
    vs = [st["v_mem"][mem], st["v_rc"]]
    if case.mode == "infer":
        lc = slice(case.LCr - lcv, None)
        ks.append(st["k_lc"][lc])
        vs.append(st["v_lc"][lc])
    k = torch.cat(ks + [st["k_utt"]])
    v = torch.cat(vs + [st["v_utt"]])
    if case.mode == "train":
        cfg = SimpleNamespace(
            segment_length=case.s,
            right_context_length=case.R,
            left_context_length=case.LC,
            max_memory_size=case.M,
            use_mem=case.M > 0,
        )
        mask = _EmformerBase._attention_mask(cfg, case.U, q.device)
    else:  # EmformerAttention.infer's mask
        mask = torch.zeros(q.shape[0], k.shape[0], dtype=torch.bool)
        if st["q_sum"].shape[0]:
            mask[-1, :mv] = True
    assert mask.shape == (q.shape[0], k.shape[0])
    kpm = None
    if key_lengths is not None:
        kpm = torch.arange(k.shape[0])[None] >= key_lengths[:, None].long()
    return q, k, v, mask, kpm


def _kwargs(case, key_lengths):
    past = None if case.past is None else torch.full((1, case.B), case.past, dtype=torch.int32)
    return dict(
        num_heads=case.H,
        segment_length=case.s,
        right_context=case.R,
        left_context=case.LC,
        max_memory=case.M,
        scale=case.hd**-0.5,
        key_lengths=key_lengths,
        past_length=past,
    )


def _oracle(case, st, key_lengths, dout, dtype):
    """emformer_attention_ref on the concatenations in `dtype`, and the streams' gradients."""
    leaves = {k: t.detach().to(dtype).requires_grad_() for k, t in st.items() if t is not None}
    full = {k: leaves.get(k) for k in st}
    q, k, v, mask, kpm = _dense(case, full, key_lengths)
    out = emformer_attention_ref(q, k, v, mask, kpm, case.H)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.to(dtype))
    return out, dict(zip(leaves, grads))


def _cast(st, dtype):
    """The streams in `dtype`, keeping the layout (strides) of the float64 views."""
    out = {}
    for name, t in st.items():
        if t is None:
            out[name] = None
            continue
        base = t._base if t._base is not None else t
        out[name] = torch.as_strided(base.to(dtype), t.shape, t.stride(), t.storage_offset())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_kernel_matches_oracle(case, dtype):
    gen = torch.Generator().manual_seed(17 * case.U + case.B)
    st64 = _streams(case, gen)
    key_lengths = _key_lengths(case, st64)
    st = _cast(st64, dtype)
    kwargs = _kwargs(case, key_lengths)
    out, lse = E.segment_attention_fwd(*(st[name] for name in E.STREAMS), **kwargs)
    tq = out.shape[0]
    dout = _rnd(gen, tq, case.B, case.H * case.hd).to(dtype)
    grads = E.segment_attention_bwd(dout, *(st[name] for name in E.STREAMS), out, lse, **kwargs)
    oracle, oracle_grads = _oracle(case, st, key_lengths, dout, torch.float64)
    ref, ref_grads = _oracle(case, st, key_lengths, dout, dtype)
    assert out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (case.B, case.H, tq) and lse.dtype == torch.float32
    assert_close_to_oracle(out, oracle, ref, name="out")
    for name, t in st.items():
        if t is None:
            assert grads[name] is None
            continue
        g = grads[name]
        assert g.shape == t.shape and g.dtype == dtype, name
        assert_close_to_oracle(g, oracle_grads[name], ref_grads[name], name=f"d{name}")


def test_fallback_rows_are_uniform():
    """A row that sees no key outputs the mean of every value row of its (b, h) (masked
    ones included), and its gradient goes to v only: dO / Tk to every key."""
    case = CASES[6]
    gen = torch.Generator().manual_seed(3)
    st = _streams(case, gen)
    key_lengths = _key_lengths(case, st)
    st = _cast(st, torch.float32)
    kwargs = _kwargs(case, key_lengths)
    out, lse = E.segment_attention_fwd(*(st[name] for name in E.STREAMS), **kwargs)
    # batch element 2 (length 1): segments 1 and 2 see nothing
    empty = torch.isinf(lse[2, 0])
    assert empty.tolist() == [False] * 4 + [True] * 8
    mean = st["v_utt"][:, 2].mean(0)
    torch.testing.assert_close(out[4:, 2], mean.expand(8, -1))
    dout = torch.zeros_like(out)
    dout[6, 2] = 1.0
    grads = E.segment_attention_bwd(dout, *(st[name] for name in E.STREAMS), out, lse, **kwargs)
    torch.testing.assert_close(grads["v_utt"][:, 2], torch.full((12, 32), 1 / 12))
    assert not grads["q_utt"].any() and not grads["k_utt"].any()


def test_writes_into_packed_gradient_buffers_and_is_deterministic():
    case = CASES[5]
    gen = torch.Generator().manual_seed(5)
    st = _cast(_streams(case, gen), torch.float32)
    kwargs = _kwargs(case, _key_lengths(case, st))
    args = [st[name] for name in E.STREAMS]
    out, lse = E.segment_attention_fwd(*args, **kwargs)
    dout = torch.randn(out.shape, generator=gen)
    first = E.segment_attention_bwd(dout, *args, out, lse, **kwargs)
    n_rc, U, D = st["q_rc"].shape[0], case.U, case.H * case.hd
    packed = torch.full((n_rc + U, case.B, 3 * D), math.nan)
    into = dict(zip(("q_rc", "k_rc", "v_rc"), packed[:n_rc].split(D, dim=2)))
    into.update(zip(("q_utt", "k_utt", "v_utt"), packed[n_rc:].split(D, dim=2)))
    second = E.segment_attention_bwd(dout, *args, out, lse, **kwargs, grads=into)
    for name in E.STREAMS:
        if first[name] is not None:
            assert torch.equal(first[name], second[name]), name
    for name, view in into.items():
        assert second[name] is view
    assert not packed.isnan().any()


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(q_rc=torch.zeros(2, 2, 32)), "q_rc must have n \\* R"),
        (dict(k_mem=torch.zeros(1, 2, 32), v_mem=torch.zeros(1, 2, 32)), "k_mem must have 2 rows"),
        (dict(q_sum=torch.zeros(2, 2, 32)), "q_sum must have 0 or n = 3"),
        (dict(v_utt=torch.zeros(9, 2, 32)), "v_utt must have k_utt's shape"),
        (dict(k_utt=torch.zeros(10, 2, 32, dtype=torch.float16)), "dtype"),
        (dict(q_utt=torch.zeros(10, 2, 64)[..., ::2]), "unit last stride"),
        (dict(num_heads=4), "head dim 8"),
        (dict(negative_inf=-10.0), "negative_inf"),
        (dict(key_lengths=torch.zeros(3, dtype=torch.int32)), "key_lengths"),
        (dict(past_length=torch.zeros(1, 2, dtype=torch.int32)), "past_length is for infer"),
        (dict(k_lc=torch.zeros(0, 2, 32)), "k_lc and v_lc"),
    ],
)
def test_bad_arguments_raise_clear_errors(change, match):
    R, U, D = 1, 10, 32
    args = dict(
        q_rc=torch.zeros(3 * R, 2, D),
        q_utt=torch.zeros(U, 2, D),
        q_sum=torch.zeros(3, 2, D),
        k_mem=torch.zeros(2, 2, D),
        k_rc=torch.zeros(3 * R, 2, D),
        k_lc=None,
        k_utt=torch.zeros(U, 2, D),
        v_mem=torch.zeros(2, 2, D),
        v_rc=torch.zeros(3 * R, 2, D),
        v_lc=None,
        v_utt=torch.zeros(U, 2, D),
    )
    kwargs = dict(
        num_heads=2, segment_length=4, right_context=R, left_context=2, max_memory=2, scale=0.25
    )
    for key, val in change.items():
        (args if key in args else kwargs)[key] = val
    with pytest.raises(ValueError, match=match):
        E.segment_attention_fwd(*(args[name] for name in E.STREAMS), **kwargs)


CUDA_CASES = [
    # the Emformer base configuration (hd 64, s 16, LC 32, R 4, M 4) and wider heads
    Case("train", 4, 8, 64, 250, 16, 4, 32, 4, lengths=[250, 201, 160, 97], name="base"),
    Case("train", 2, 4, 128, 100, 16, 0, 0, 4, lengths=[100, 40], name="R0_LC0_hd128"),
    Case("infer", 8, 8, 64, 16, 16, 4, 32, 4, [16] * 7 + [9], Mr=4, LCr=32, past=48, name="step"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=repr)
def test_cuda_kernel_matches_oracle(case, dtype):
    gen = torch.Generator().manual_seed(3 * case.U + case.B)
    st64 = {k: None if t is None else t.cuda() for k, t in _streams(case, gen).items()}
    key_lengths = _key_lengths(case, st64)
    key_lengths = None if key_lengths is None else key_lengths.cuda()
    st = {k: None if t is None else t.to(dtype) for k, t in st64.items()}
    kwargs = _kwargs(case, key_lengths)
    if kwargs["past_length"] is not None:
        kwargs["past_length"] = kwargs["past_length"].cuda()
    out, lse = E.segment_attention_fwd(*(st[name] for name in E.STREAMS), **kwargs)
    dout = _rnd(gen, out.shape[0], case.B, case.H * case.hd).to("cuda", dtype)
    grads = E.segment_attention_bwd(dout, *(st[name] for name in E.STREAMS), out, lse, **kwargs)
    oracle, oracle_grads = _oracle(case, st, key_lengths, dout, torch.float64)
    ref, ref_grads = _oracle(case, st, key_lengths, dout, dtype)
    assert_close_to_oracle(out, oracle, ref, name="out")
    for name, t in st.items():
        if t is not None:
            assert_close_to_oracle(grads[name], oracle_grads[name], ref_grads[name], name=name)
