"""Benchmark: per-component clustering against the paper's global mean-shift, on real outputs.

Runs a shipped model once per test well (deterministic pass), then times
``companion.inference.postprocess.segment`` on the same outputs with ``clustering="global"`` (the paper)
and ``clustering="components"`` (mean-shift inside each connected foreground component), at
one bandwidth / threshold, in one run. Prints per-well means, AP50 of each (so that speed is
not bought with accuracy) and, last, the ratio of the two total times.

    OMP_NUM_THREADS=1 python benchmarks/bench_clustering.py                 # all 47 test wells
    python benchmarks/bench_clustering.py --wells C03 C04 C05 --model concrete
"""

from __future__ import annotations

import argparse
import time

import torch

from companion import pretrained
from companion.data.bbbc010 import TEST_WELLS, load_bbbc010
from companion.evaluation.metrics import instance_metrics
from companion.inference.outputs import image_outputs
from companion.inference.recipes import Recipe
from companion.inference.segmenter import Segmenter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="baseline", help="shipped model name")
    parser.add_argument("--wells", nargs="+", default=None, help="default: every complete test well")
    parser.add_argument("--bandwidth", type=float, default=2.0)
    parser.add_argument("--threshold", type=float, default=3.0)
    parser.add_argument("--max-points", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = pretrained.load(args.model)
    samples = load_bbbc010(wells=args.wells or TEST_WELLS, skip_incomplete=True, progress=False)
    outputs = [image_outputs(model, s.image, draws=0) for s in samples]
    seconds, ap50 = {}, {}
    for clustering in ("global", "components"):
        recipe = Recipe(args.bandwidth, args.threshold, clustering=clustering, max_points=args.max_points)
        segmenter = Segmenter(model, recipe)
        segmenter.segment(outputs[0])  # warm-up
        start = time.perf_counter()
        predictions = [segmenter.segment(o)[:2] for o in outputs]
        seconds[clustering] = time.perf_counter() - start
        masks, scores = zip(*predictions)
        ap50[clustering] = instance_metrics([s.instances for s in samples], masks, scores)["AP50"]
    print(
        f"model {args.model}, {len(samples)} wells, bandwidth {args.bandwidth}, threshold "
        f"{args.threshold}, max_points {args.max_points}, torch threads {args.threads}"
    )
    for clustering in seconds:
        print(
            f"{clustering:10s}: {seconds[clustering] / len(samples):6.2f} s per well, "
            f"AP50 {ap50[clustering]:.3f}"
        )
    print(
        f"components/global seconds on {len(samples)} wells: {seconds['components'] / seconds['global']:.2f}"
    )


if __name__ == "__main__":
    main()
