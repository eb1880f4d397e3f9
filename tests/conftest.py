"""Shared pytest setup."""

import os

import torch

# Without a GPU, the Triton backend's tests run its kernels in the Triton interpreter. Triton reads TRITON_INTERPRET
# when it is first imported (diffusers imports it), so it is set here, before any test module is collected. On CPU
# nothing else can run Triton kernels, so other tests are unaffected; a value set by the user is kept.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
