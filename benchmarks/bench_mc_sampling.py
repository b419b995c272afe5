"""Benchmark: Monte-Carlo dropout sampling, batched draws vs. sequential forward passes.

Times :func:`companion.inference.sampling.mc_predict` on one BBBC010-sized image (2 x 520 x 696, padded
to 528 x 704) with the paper's U-Net (``base_filters=19``, depth 5, Concrete Dropout):

* ``sequential``: ``n_draws`` forward passes of batch 1 (``batch=1``);
* ``batched``: the image repeated ``batch`` times, one pass per ``batch`` draws;
* the same two with the model's weights in ``channels_last`` memory format too
  (``--channels-last``; :func:`~companion.inference.sampling.mc_predict` always feeds channels-last input).

Measured on an idle 2-core CPU (2 threads): batched 0.79-0.82x the speed of sequential, i.e.
batching does not pay on the CPU (``mc_predict`` therefore defaults to one draw per pass there);
channels-last input made each pass 1.9x faster (8 draws: 4.9 s -> 3.0 s).

Each configuration gets one warm-up run; the minimum over ``--repeats`` runs is reported.
Weights are random (timing does not depend on them). Run it on an otherwise idle machine::

    OMP_NUM_THREADS=2 python benchmarks/bench_mc_sampling.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from companion.inference.sampling import mc_predict
from companion.model.unet import UNet


def time_it(fn, repeats: int) -> tuple[float, float]:
    """Minimum wall-clock and CPU (process) time of ``fn()`` over ``repeats`` runs, after a warm-up.

    On a shared machine the wall-clock time depends on the load; the CPU time (summed over
    threads) measures the work and is the more stable of the two.
    """
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-draws", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--size", type=int, nargs=2, default=(520, 696), metavar=("H", "W"))
    parser.add_argument("--base-filters", type=int, default=19)
    parser.add_argument("--channels-last", action="store_true", help="also time channels_last memory format")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = UNet(base_filters=args.base_filters, dropout="concrete").to(args.device).eval()
    image = np.random.default_rng(0).random((2, *args.size), dtype=np.float32)
    print(
        f"device={args.device} threads={torch.get_num_threads()} image=2x{args.size[0]}x{args.size[1]} "
        f"base_filters={args.base_filters} n_draws={args.n_draws} batch={args.batch}"
    )

    results: dict[str, float] = {}
    formats = [("contiguous", torch.contiguous_format)]
    if args.channels_last:
        formats.append(("channels_last", torch.channels_last))
    for name, memory_format in formats:
        model = model.to(memory_format=memory_format)
        for label, batch in (("sequential", 1), ("batched", args.batch)):
            seconds, cpu = time_it(
                lambda model=model, batch=batch: mc_predict(model, image, args.n_draws, batch, seed=0),
                args.repeats,
            )
            results[f"{name}/{label}"] = seconds
            results[f"{name}/{label}/cpu"] = cpu
            print(
                f"{name:14s} {label:10s} batch={batch:2d}: wall {seconds:7.2f} s "
                f"({seconds / args.n_draws:.2f} s per draw), CPU {cpu:7.2f} s"
            )
        ratio = results[f"{name}/sequential"] / results[f"{name}/batched"]
        cpu_ratio = results[f"{name}/sequential/cpu"] / results[f"{name}/batched/cpu"]
        results[f"{name}/speed-up"] = ratio
        print(f"{name:14s} speed-up of batched over sequential: wall {ratio:.2f}x, CPU {cpu_ratio:.2f}x")
    if args.channels_last:
        best = results["contiguous/sequential"] / results["channels_last/batched"]
        print(f"channels_last + batched vs contiguous sequential: wall {best:.2f}x")
    return results


if __name__ == "__main__":
    main()
