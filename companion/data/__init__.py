"""The data: what every later layer reads.

BBBC010 wells as ``(2, H, W)`` images and ``(K, H, W)`` mask stacks (:mod:`.bbbc010`), all wells
in one archive file (:mod:`.archive`), your own images (:mod:`.userdata`), synthetic worms
(:mod:`.synthetic`) and simulated network outputs (:mod:`.simulate`), the three-class training
targets (:mod:`.targets`) and augmentation on the CPU and the GPU (:mod:`.augment`,
:mod:`.augment_torch`).

May import: the package's private helpers (``companion._io``, ``companion._device``) only.
"""
