"""seqkern's Triton kernels, installed as `seqkern._triton`.

This folder is never installed as a top-level `triton_kernels`: that import name belongs to
Triton's own companion package. Importing any module here imports triton; set
TRITON_INTERPRET=1 *before* that import to run the kernels on CPU tensors.
"""
