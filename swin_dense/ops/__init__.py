"""Pure tensor functions below the layers (no ``nn.Module``): the window layout
(:mod:`.window`), the plain window attention (:mod:`.attention`) and the eager fast path behind
one switch (:mod:`.cpu_fast`, with its attention kernels in :mod:`.chunked_attention` and
:mod:`.token_attention`).

Imports run one way inside the package: window <- attention <- chunked_attention <-
token_attention <- cpu_fast.
"""
