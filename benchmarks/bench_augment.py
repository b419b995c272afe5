"""Augmented training crops per second: the scipy path vs. the torch path (CPU, and CUDA when present).

* ``scipy``: :class:`companion.data.augment.WormCropDataset` items made one at a time in this process
  (what one DataLoader worker delivers), target included;
* ``torch``: :class:`companion.data.augment_torch.DeviceCropSource` making batches of ``--batch``
  crops on the device (CPU with ``--threads`` torch threads; CUDA synchronised before timing).

Both make the same transforms (crop, flips, rotation, elastic deformation) of the same images:
the BBBC010 training wells when ``$BBBC010_ROOT`` is set (the first ``--wells`` of them), else
synthetic 520 x 696 wells. Each path gets one warm-up batch. The last line is
``torch/scipy crops per second on CPU: <ratio>``.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_augment.py [--crops 64 --crop-size 512]``
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import torch


def bench_data(n_wells: int, shape: tuple[int, int] = (520, 696)):
    """``(samples, description)``: BBBC010 training wells when ``$BBBC010_ROOT`` is set, else synthetic."""
    if os.environ.get("BBBC010_ROOT"):
        from companion.data.bbbc010 import FIT_WELLS, load_bbbc010

        return load_bbbc010(None, FIT_WELLS[:n_wells], skip_incomplete=True, progress=False), "BBBC010 wells"
    from companion.data.synthetic import make_dataset

    return make_dataset(n_wells, seed=0, shape=shape), f"synthetic {shape[0]} x {shape[1]} wells"


def scipy_crops_per_s(
    samples: Sequence, crop_size: int, n_crops: int, *, max_seconds: float = float("inf")
) -> float:
    """Crops per second of :class:`~companion.data.augment.WormCropDataset` in one process."""
    from companion.data.augment import WormCropDataset

    dataset = WormCropDataset(list(samples), crop_size=crop_size, length=n_crops + len(samples), seed=0)
    for i in range(len(samples)):  # warm-up: each sample's padded copy and mask words are cached
        dataset[n_crops + i]
    start, done = time.perf_counter(), 0
    while done < n_crops and (done == 0 or time.perf_counter() - start < max_seconds):
        dataset[done]
        done += 1
    return done / (time.perf_counter() - start)


def torch_crops_per_s(
    samples: Sequence,
    crop_size: int,
    n_crops: int,
    *,
    batch: int = 8,
    device: str | torch.device = "cpu",
    max_seconds: float = float("inf"),
) -> float:
    """Crops per second of :class:`~companion.data.augment_torch.DeviceCropSource` on ``device``."""
    from companion.data.augment_torch import DeviceCropSource

    device = torch.device(device)
    source = DeviceCropSource(list(samples), crop_size=crop_size, device=device)
    generator = torch.Generator().manual_seed(0)

    def one_batch(first: int) -> None:
        source.crops([(first + j) % len(source) for j in range(batch)], generator)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    one_batch(0)  # warm-up
    sync()
    start, done = time.perf_counter(), 0
    while done < n_crops and (done == 0 or time.perf_counter() - start < max_seconds):
        one_batch(done)
        done += batch
    sync()
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=64, help="crops per path")
    parser.add_argument("--crop-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="crops per torch batch")
    parser.add_argument("--wells", type=int, default=4, help="images to crop from")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(520, 696),
        metavar=("H", "W"),
        help="synthetic image size (without $BBBC010_ROOT)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    samples, what = bench_data(args.wells, tuple(args.size))
    print(
        f"{len(samples)} {what}, {args.crops} crops of {args.crop_size} x {args.crop_size} per path, "
        f"torch batch {args.batch}, {args.threads} torch thread(s)"
    )
    result = {"scipy_cpu": scipy_crops_per_s(samples, args.crop_size, args.crops)}
    print(f"scipy path (one process):   {result['scipy_cpu']:8.1f} crops/s")
    result["torch_cpu"] = torch_crops_per_s(samples, args.crop_size, args.crops, batch=args.batch)
    print(f"torch path on the CPU:      {result['torch_cpu']:8.1f} crops/s")
    if torch.cuda.is_available():
        result["torch_cuda"] = torch_crops_per_s(
            samples, args.crop_size, max(args.crops, 16 * args.batch), batch=args.batch, device="cuda"
        )
        print(
            f"torch path on CUDA:         {result['torch_cuda']:8.1f} crops/s "
            f"({torch.cuda.get_device_name()})"
        )
    result["ratio_cpu"] = result["torch_cpu"] / result["scipy_cpu"]
    print(f"torch/scipy crops per second on CPU: {result['ratio_cpu']:.2f}")
    return result


if __name__ == "__main__":
    main()
