"""Pallas kernels for the adder convolution (forward and input gradient).

- `kernels.gpu`: Pallas Triton kernels (CUDA cores; implicit im2col, no
  patches matrix), also run in interpret mode on the CPU.
- `kernels.tpu_batch`: Pallas Mosaic TPU kernels with the images on the
  lanes (no patches matrix), for batches of at least 64.
- `kernels.tpu`: Pallas Mosaic TPU kernels ((8, 128)-aligned blocks over a
  transposed patches matrix), any batch.
Both TPU families are tested in TPU interpret mode on the CPU.
- `kernels.dispatch.backend_for`: what `addernet_jax.ops` calls to pick one.

The filter gradient is not here: it is an ordinary convolution weight gradient
minus a correction (`addernet_jax.reference.filter_grad`).
"""
