"""Benchmark: companion.inference.meanshift.mean_shift against sklearn.cluster.MeanShift.

Both cluster the same embedding-like points (tight 16-d Gaussian blobs ~4-6 apart, as a
trained discriminative embedding, plus 2 % uniform outliers) with the same bandwidth and bin
seeding, in one run. Prints both wall times, their ratio and the adjusted Rand index of the
two partitions.

    OMP_NUM_THREADS=2 python benchmarks/bench_mean_shift.py            # 30,000 points, 2 cores
    python benchmarks/bench_mean_shift.py --n 100000 --device cuda
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from sklearn.cluster import MeanShift
from sklearn.metrics import adjusted_rand_score

from companion.inference.meanshift import mean_shift


def embedding_like_points(
    n: int, dim: int, n_blobs: int, spread: float, outliers: float, seed: int
) -> np.ndarray:
    """(n, dim) float32: ``n_blobs`` Gaussian blobs (std ``spread`` per axis), centres at least 4
    and typically 4-6 apart, plus uniform outliers."""
    rng = np.random.default_rng(seed)
    centers = np.empty((0, dim))
    while len(centers) < n_blobs:
        candidate = rng.normal(0.0, 5.0 / np.sqrt(2 * dim), size=dim)
        if len(centers) == 0 or np.linalg.norm(centers - candidate, axis=1).min() >= 4.0:
            centers = np.vstack([centers, candidate])
    points = centers[rng.integers(0, n_blobs, n)] + rng.normal(0.0, spread, size=(n, dim))
    n_out = int(outliers * n)
    points[:n_out] = rng.uniform(points.min(), points.max(), size=(n_out, dim))
    return points.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30_000, help="number of points")
    parser.add_argument("--dim", type=int, default=16, help="embedding dimension")
    parser.add_argument("--blobs", type=int, default=15, help="number of instances (blobs)")
    parser.add_argument("--spread", type=float, default=0.25, help="blob standard deviation per axis")
    parser.add_argument("--outliers", type=float, default=0.02, help="fraction of uniform outliers")
    parser.add_argument("--bandwidth", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument(
        "--sklearn-jobs",
        type=int,
        default=None,
        help="n_jobs of MeanShift (default: sklearn's, sequential; its joblib workers get "
        "one task per seed, which made n_jobs=2 ~30x slower on 2 cores)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    points = embedding_like_points(args.n, args.dim, args.blobs, args.spread, args.outliers, args.seed)
    mean_shift(points[:1000], args.bandwidth, device=args.device)  # warm-up (lazy torch init)

    start = time.perf_counter()
    ours = mean_shift(points, args.bandwidth, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - start

    start = time.perf_counter()
    ref = MeanShift(bandwidth=args.bandwidth, bin_seeding=True, n_jobs=args.sklearn_jobs).fit(points)
    t_sklearn = time.perf_counter() - start

    ari = adjusted_rand_score(ref.labels_, ours.labels)
    same_count = len(ours.centers) == len(ref.cluster_centers_)
    max_dev = float(np.abs(ours.centers - ref.cluster_centers_).max()) if same_count else float("nan")
    print(f"load average before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f} (shared machine?)")
    print(
        f"points: {args.n} x {args.dim}, {args.blobs} blobs, bandwidth {args.bandwidth}, "
        f"torch threads {args.threads}, sklearn n_jobs {args.sklearn_jobs}, device {args.device}"
    )
    print(f"sklearn.cluster.MeanShift : {t_sklearn:8.3f} s  ({len(ref.cluster_centers_)} centres)")
    print(f"companion mean_shift      : {t_ours:8.3f} s  ({len(ours.centers)} centres)")
    print(f"speed-up                  : {t_sklearn / t_ours:8.1f} x")
    print(f"adjusted Rand index       : {ari:8.4f}")
    print(f"max centre deviation      : {max_dev:8.2e}")


if __name__ == "__main__":
    main()
