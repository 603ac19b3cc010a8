"""The compiled layer: Numba kernels and the SIMD and half-precision helpers they use.

rows: one row at a time (any K); tiles: 64 rows at a time with the vector lanes across
rows (small K); blocks: 16 float32 rows of K <= 320 at a time (transposed in registers
up to K = 32, row-wise beyond); softmax: softmax, log_softmax, logsumexp; shards: classes
split across shards; simd / half: vector intrinsics and float16/bfloat16 rows; jit: compile options.
"""
