"""Compile every seqkern Triton kernel ahead of time for one GPU arch, without a GPU.

    python tests/build/triton_aot.py 90

Prints one JSON object: {"compiled": [...], "failed": {name: error}}. Run by
tests/build/test_triton_compile.py in a fresh process without TRITON_INTERPRET (triton decides
interpreter-or-compiler when it is imported, so the two cannot share a process).
"""

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def _compile(kernel, types: dict, constexprs: dict, arch: int):
    signature = {
        name: "constexpr" if name in constexprs else types.get(name, "i32")
        for name in kernel.arg_names
    }
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))


def _adaln_variants():
    from seqkern._triton import adaln as A

    for dt in ("bf16", "fp32"):
        for per_token in (False, True):
            fwd_types = {n: f"*{dt}" for n in ("X", "G", "Bt", "Y")}
            fwd_types.update(Mean="*fp32", Rstd="*fp32", eps="fp32")
            yield (
                f"adaln_fwd-{dt}-tok{per_token}",
                A._adaln_fwd_kernel,
                fwd_types,
                {"PER_TOKEN": per_token, "BLOCK_D": 1024},
            )
            bwd_types = {n: f"*{dt}" for n in ("DY", "X", "G", "DX", "DG", "DB")}
            bwd_types.update(Mean="*fp32", Rstd="*fp32", WS="*fp32")
            yield (
                f"adaln_bwd-{dt}-tok{per_token}",
                A._adaln_bwd_kernel,
                bwd_types,
                {"PER_TOKEN": per_token, "BLOCK_D": 1024},
            )


def _relbias_variants():
    from seqkern._triton import relbias as R

    for dt, precision, hd in (("bf16", "tf32", 64), ("fp32", "ieee", 128)):
        for mode, gate, masks in (
            (R.BIAS_REL, True, True),
            (R.BIAS_DENSE, True, False),
            (R.BIAS_NONE, False, False),
        ):
            block = 64 if hd <= 64 else 32
            types = {n: f"*{dt}" for n in ("Q", "K", "V", "O", "DO")}
            types.update(
                LSE="*fp32",
                DELTA="*fp32",
                NORM="*fp32",
                DK="*fp32",
                DV="*fp32",
                DQ="*fp32",
                DG="*fp32",
                DRB="*fp32",
                RB=f"*{dt}",
                G=f"*{dt}",
                AM=f"*{dt}",
                KPM="*i8",
                KEND="*i32",
                scale="fp32",
            )
            const = {
                "BIAS_MODE": mode,
                "HAS_GATE": gate,
                "HAS_AM": masks,
                "HAS_KPM": masks,
                "BLOCK_M": block,
                "BLOCK_N": block,
                "BLOCK_D": hd,
                "PRECISION": precision,
            }
            for name in ("RB",) if mode == R.BIAS_NONE else ():
                const[name] = None
            if not gate:
                const["G"] = None
            if not masks:
                const.update(AM=None, KPM=None, KEND=None)
            tag = f"{dt}-mode{mode}-gate{gate}-masks{masks}"
            yield (f"relbias_fwd-{tag}", R._relbias_fwd_kernel, types, const)
            bwd_const = dict(const, EXACT_DELTA=dt == "fp32")
            yield (f"relbias_bwd_dkdv-{tag}", R._relbias_bwd_dkdv_kernel, types, bwd_const)
            dq_const = dict(bwd_const, BIAS_GRAD=mode != R.BIAS_NONE)
            if not gate:
                dq_const["DG"] = None
            if mode == R.BIAS_NONE:
                dq_const["DRB"] = None
            yield (f"relbias_bwd_dq-{tag}", R._relbias_bwd_dq_kernel, types, dq_const)


def _mega_attention_variants():
    from seqkern._triton import mega_attention as M

    # (dtype, precision, lq, lk, K, V, bias gradient, combinations of (bias form, causal,
    # padding)): MEGA's training shape with every combination, the widest rows (fp32, K = 256)
    # and a decoding step with two each; tiles as the launcher picks them for a GPU
    every = [(m, c, c) for m in (M.BIAS_REL, M.BIAS_DENSE) for c in (True, False)]
    two = [(M.BIAS_REL, True, True), (M.BIAS_DENSE, False, False)]
    for dt, precision, lq, lk, qk, vs, bias_grad, combos in (
        ("bf16", "tf32", 512, 512, 128, 1024, True, every),
        ("fp32", "ieee", 128, 128, 256, 2048, True, two),
        ("bf16", "tf32", 1, 300, 64, 1024, False, two),
    ):
        cfg = M.blocks(lq, lk, qk, vs, "cuda", 4 if dt == "fp32" else 2)
        types = {n: f"*{dt}" for n in ("Q", "K", "V", "BIAS", "O", "DO", "DQ", "DK", "DV")}
        types.update(LSE="*fp32", DELTA="*fp32", WS="*fp32", KPM="*i8", KEND="*i32", scale="fp32")
        for mode, causal, padded in combos:
            flags = dict(BIAS_MODE=mode, CAUSAL=causal, HAS_KPM=padded, PRECISION=precision)
            if not padded:
                flags.update(KPM=None, KEND=None)
            tag = f"{dt}-K{qk}-V{vs}-lq{lq}-mode{mode}-causal{causal}-pad{padded}"
            for stage, kernel in (
                ("fwd", M._chunk_attention_fwd_kernel),
                ("dk", M._chunk_attention_bwd_dk_kernel),
                ("dv", M._chunk_attention_bwd_dv_kernel),
                ("dq", M._chunk_attention_bwd_dq_kernel),
            ):
                const = dict(cfg[stage], **flags)
                const.pop("num_warps")  # compiled with the default 4 warps here
                if stage == "dq":
                    const["BIAS_GRAD"] = bias_grad
                    if not bias_grad:
                        const["WS"] = None
                yield (f"mega_attention_{stage}-{tag}", kernel, types, const)


def _attention_variants():
    import torch
    from seqkern._triton import attention as A

    # VALL-E's heads (bf16, hd 64 and 128) and fp32 full precision; for each, the three mask
    # forms the module meets: causal and none, a bool key padding mask (row + key_end), and a
    # full additive mask; tiles as the launchers pick them for a GPU
    forms = [
        (True, A.MASK_NONE, False, False),
        (False, A.MASK_BOOL, True, True),
        (False, A.MASK_ADD, False, False),
    ]
    for dt, dtype, precision, hd in (
        ("bf16", torch.bfloat16, "tf32", 64),
        ("bf16", torch.bfloat16, "tf32", 128),
        ("fp32", torch.float32, "ieee", 128),
    ):
        types = {n: f"*{dt}" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
        types.update(LSE="*fp32", DELTA="*fp32", NORM="*fp32", KEND="*i32", scale="fp32")
        device = torch.device("cuda")
        for causal, mode, row, kend in forms:
            types["M"] = "*u8" if mode == A.MASK_BOOL else f"*{dt}"
            flags = dict(CAUSAL=causal, MASK_MODE=mode, MASK_ROW=row, HAS_KEND=kend)
            flags["PRECISION"] = precision
            if mode == A.MASK_NONE:
                flags["M"] = None
            if not kend:
                flags["KEND"] = None
            tag = f"{dt}-hd{hd}-causal{causal}-mask{mode}"
            for name, kernel, cfg in (
                ("fwd", A._attn_fwd_kernel, A.fwd_config(hd, dtype, device)),
                ("bwd_dkdv", A._attn_bwd_dkdv_kernel, A.bwd_config(hd, dtype, device)),
                ("bwd_dq", A._attn_bwd_dq_kernel, A.bwd_config(hd, dtype, device)),
            ):
                const = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
                if name != "fwd":  # fp32 sums delta from its own p and dp (exact_delta_for)
                    const["EXACT_DELTA"] = A.exact_delta_for(dtype)
                yield (f"attention_{name}-{tag}", kernel, types, dict(const, **flags))
        delta = {"BLOCK_M": 64, "BLOCK_D": max(16, hd)}
        yield (f"attention_bwd_delta-{dt}-hd{hd}", A._attn_bwd_delta_kernel, types, delta)


def _emformer_attention_variants():
    from seqkern._triton import emformer_attention as E

    # training (bf16 hd 64 with/without key padding, fp32 hd 128) and infer (bf16 hd 64 with
    # past_length and padding, fp16 hd 128 with past_length); tiles as the launchers pick them
    yield from E.variants()


def _emformer_conv_variants():
    from seqkern._triton import emformer_conv as C

    # ConvEmformer's depthwise conv: each dtype at k = 8 with and without a cache, k = 1, k = 32
    yield from C.variants()


def main(arch: int) -> dict:
    result = {"compiled": [], "failed": {}}
    for name, kernel, types, constexprs in [
        *_adaln_variants(),
        *_relbias_variants(),
        *_mega_attention_variants(),
        *_attention_variants(),
        *_emformer_attention_variants(),
        *_emformer_conv_variants(),
    ]:
        try:
            compiled = _compile(kernel, types, constexprs, arch)
            assert "ptx" in compiled.asm and "cubin" in compiled.asm, "no ptx/cubin"
            result["compiled"].append(name)
        except Exception as err:  # noqa: BLE001 - report every failure
            result["failed"][name] = f"{type(err).__name__}: {str(err)[-1500:]}"
    return result


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
