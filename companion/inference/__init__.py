"""From an image to instances.

Network passes, deterministic, Monte-Carlo and flipped (:mod:`.sampling`), kept compactly
(:mod:`.outputs`); mean shift (:mod:`.meanshift`) and the post-processing of one pass
(:mod:`.postprocess`); the agglomeration of several passes and its uncertainty
(:mod:`.agglomerate`); every inference setting in a recipe, shipped beside the weights
(:mod:`.recipes`); the one path through all of it, :class:`.segmenter.Segmenter`; ensembles of
models (:mod:`.ensemble`).

May import: :mod:`companion.data`, :mod:`companion.model`, :mod:`companion.pretrained`.
"""
