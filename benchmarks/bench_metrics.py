"""Time companion.evaluation.metrics on a BBBC010-sized test set (50 images of 520 x 696, ~15 worms each).

Also compares the two ways of computing all pairwise intersections: a dense float32 matrix
product of the flattened masks and a scipy.sparse CSR product. The metrics pick the sparse
product unless the masks fill more than 5 % of the image on average.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_metrics.py``
"""

from __future__ import annotations

import time

import numpy as np

from companion.data.synthetic import make_sample
from companion.evaluation import metrics

SHAPE = (520, 696)


def _test_set(n_images: int = 50, n_worms: int = 15):
    rng = np.random.default_rng(0)
    gts, preds, scores = [], [], []
    for i in range(n_images):
        gt = make_sample(i, shape=SHAPE, n_worms=n_worms).instances
        shifted = np.roll(gt, tuple(rng.integers(-3, 4, size=2)), axis=(1, 2))
        gts.append(gt), preds.append(shifted), scores.append(rng.random(len(shifted)))
    return gts, preds, scores


def _best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    gts, preds, scores = _test_set()
    n_inst = sum(len(g) for g in gts)
    fill = np.mean([g.mean() for g in gts])
    print(f"{len(gts)} images {SHAPE}, {n_inst} gt instances, mean fill per mask {fill:.4f}")
    for label, dense in (("dense float32 matmul", True), ("sparse CSR product", False)):
        t = _best_of(lambda dense=dense: [metrics.overlaps(g, p, dense=dense) for g, p in zip(gts, preds)])
        print(f"pairwise intersections, {label:22s}: {t:.3f} s")
    t = _best_of(lambda: metrics.instance_metrics(gts, preds, scores))
    print(f"instance_metrics() on all {len(gts)} images (default product): {t:.3f} s")


if __name__ == "__main__":
    main()
