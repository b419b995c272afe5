"""The network: the U-Net (:mod:`.unet`), its Concrete Dropout layers (:mod:`.dropout`) and
the exported weight files it is shipped in (:mod:`.files`).

May import: :mod:`companion.data` and the private helpers.
"""
