"""Speed of the data layer against its targets (the unit tests assert no timings).

Targets: a synthetic 256 x 256 sample < 100 ms; an augmented 512 x 512 crop < 300 ms (one core
must feed a GPU at several iterations per second); all 97 complete BBBC010 wells < 60 s
(skipped without the data). Prints each measurement and its ratio to the target (< 1 is met).

    python benchmarks/bench_data.py
"""

from __future__ import annotations

import time
import warnings

from companion.data.augment import WormCropDataset
from companion.data.synthetic import make_sample


def _per_call(fn, n: int) -> float:
    fn(0)  # warm-up
    start = time.perf_counter()
    for i in range(1, n + 1):
        fn(i)
    return (time.perf_counter() - start) / n


def main() -> None:
    synthetic = _per_call(lambda seed: make_sample(seed), 5)
    print(
        f"synthetic 256x256 sample: {synthetic * 1e3:7.1f} ms  (target 100 ms, ratio {synthetic / 0.1:.2f})"
    )
    big = make_sample(0, shape=(520, 696), n_worms=12)
    dataset = WormCropDataset([big], crop_size=512, length=10)
    crop = _per_call(lambda i: dataset[i], 5)
    print(f"augmented 512x512 crop:   {crop * 1e3:7.1f} ms  (target 300 ms, ratio {crop / 0.3:.2f})")
    try:
        from companion.data.bbbc010 import load_bbbc010, resolve_root

        root = resolve_root(None, download=False)
    except Exception as err:  # no local copy: do not download from a benchmark
        print(f"BBBC010 loading: skipped ({err})")
        return
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = load_bbbc010(root, skip_incomplete=True, progress=False)
    seconds = time.perf_counter() - start
    print(f"BBBC010, {len(samples)} wells:   {seconds:7.1f} s   (target 60 s, ratio {seconds / 60:.2f})")


if __name__ == "__main__":
    main()
