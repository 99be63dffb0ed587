"""Triton kernels and their launchers, one module per op (``effssl_kernels/triton/<op>.py``).

Only ``effssl_kernels/ops`` calls these, through ``torch.library.triton_op``; import a module
here lazily (importing triton costs ~2.5 s).
"""
