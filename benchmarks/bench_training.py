"""Training throughput: the real data pipeline vs. batches already in memory (and AMP on CUDA).

Measures, in one run, with the ``cpu`` preset's crop size and batch size (full-size U-Net):

1. iterations/s of :func:`companion.step.train_step` fed by the real pipeline
   (:func:`companion.batches.make_loader`: ``WormCropDataset`` augmentation in DataLoader
   workers, pinned memory on CUDA) on the BBBC010 training wells if ``$BBBC010_ROOT`` is set,
   else on synthetic 520 x 696 worms;
2. iterations/s of the same model stepping on the same batches already in memory (on the device);
3. their ratio (target >= 0.9: the pipeline keeps the model busy);
4. augmented crops/s of the pipeline in one process (what sizes the ``colab`` preset);
5. on CUDA, the speed-up of bf16/fp16 autocast + channels-last over float32.

The two paths alternate step by step and their median step times are compared, so that load
from other processes on a shared machine disturbs the ratio as little as possible.

Run: ``OMP_NUM_THREADS=2 python benchmarks/bench_training.py [--iterations 10]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from companion.augment import WormCropDataset
from companion.batches import make_loader, single_threaded_numpy_blas, to_device
from companion.config import TrainConfig
from companion.step import autocast_dtype, build_model, train_step


def training_data(n_synthetic: int = 8):
    """BBBC010 training wells when ``$BBBC010_ROOT`` is set, else synthetic wells."""
    if os.environ.get("BBBC010_ROOT"):
        from companion.data import TRAIN_WELLS, load_bbbc010

        return load_bbbc010(None, TRAIN_WELLS, skip_incomplete=True, progress=False), "BBBC010 train wells"
    from companion.synthetic import make_dataset

    return make_dataset(n_synthetic, seed=0, shape=(520, 696)), "synthetic 520 x 696 wells"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_seconds(
    model, optimizer, batch, config, device, *, n_train, channels_last, amp_dtype, scaler=None
) -> float:
    """Seconds of one ``train_step`` (a CPU batch is moved to the device inside the timing)."""
    _sync(device)
    start = time.perf_counter()
    batch = to_device(batch, device, channels_last)
    train_step(model, optimizer, batch, n_train=n_train, config=config, scaler=scaler, amp_dtype=amp_dtype)
    _sync(device)
    return time.perf_counter() - start


def _timed_fetch(loader_iter) -> tuple[dict, float]:
    start = time.perf_counter()
    batch = next(loader_iter)
    return batch, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations per path")
    parser.add_argument("--preset", default="cpu", help="preset giving crop and batch size")
    parser.add_argument(
        "--num-workers", type=int, default=None, help="DataLoader workers (default: the preset's)"
    )
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data, source = training_data()
    n = args.iterations
    config = TrainConfig.preset(args.preset, iterations=n + 2)
    if args.num_workers is not None:
        config.num_workers = args.num_workers
    print(f"device {device}, {torch.get_num_threads()} torch threads, data: {len(data)} {source}")
    print(
        f"preset {args.preset!r}: crop {config.crop_size}, batch {config.batch_size}, "
        f"{config.num_workers} DataLoader worker(s), model {config.model} "
        f"(base_filters {config.base_filters}, depth {config.depth})"
    )

    torch.manual_seed(0)
    model = build_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    common = dict(n_train=len(data), channels_last=False, amp_dtype=None)

    # The pipeline path reads batches from a live loader, as train() does; the in-memory path
    # steps on the very same batches (a second loader of the same configuration yields the same
    # crops), loaded beforehand. The paths alternate step by step and their medians are compared,
    # so that load bursts from other processes hit both alike.
    pin = device.type == "cuda"
    in_memory = [to_device(b, device) for b in make_loader(data, config, pin_memory=pin)]
    loader = iter(make_loader(data, config, pin_memory=pin))
    for _ in range(2):  # warm-up: first batches, worker start, allocator
        batch, _ = _timed_fetch(loader)
        _step_seconds(model, optimizer, batch, config, device, **common)
    pipeline_times, memory_times = [], []
    with single_threaded_numpy_blas():  # as in train()
        for i in range(2, n + 2):
            batch, fetch = _timed_fetch(loader)
            pipeline_times.append(fetch + _step_seconds(model, optimizer, batch, config, device, **common))
            memory_times.append(_step_seconds(model, optimizer, in_memory[i], config, device, **common))
    pipeline, memory = 1 / statistics.median(pipeline_times), 1 / statistics.median(memory_times)
    print(f"real data pipeline : {pipeline:.3f} it/s (median of {n} steps)")
    print(f"batches in memory  : {memory:.3f} it/s (median of {n} steps)")
    print(f"ratio pipeline / in-memory: {pipeline / memory:.3f} (target >= 0.9)")

    for size in sorted({config.crop_size, 512}):
        dataset = WormCropDataset(data, crop_size=size, length=10 * len(data), seed=1)
        start = time.perf_counter()
        for i in range(8):
            dataset[i]
        rate = 8 / (time.perf_counter() - start)
        print(f"augmented {size} x {size} crops, one process: {rate:.2f} crops/s")

    if device.type != "cuda":
        print("no CUDA device: GPU figures not measured")
        return
    amp_dtype = autocast_dtype(config, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    fp32 = [_step_seconds(model, optimizer, in_memory[i], config, device, **common) for i in range(2, n + 2)]
    model = model.to(memory_format=torch.channels_last)
    fast = dict(n_train=len(data), channels_last=True, amp_dtype=amp_dtype, scaler=scaler)
    mixed = [_step_seconds(model, optimizer, in_memory[i], config, device, **fast) for i in range(n + 2)][
        2:
    ]  # 2 warm-up steps for the new kernels
    fp32_rate, mixed_rate = 1 / statistics.median(fp32), 1 / statistics.median(mixed)
    print(
        f"CUDA float32: {fp32_rate:.2f} it/s; {amp_dtype} autocast + channels-last: "
        f"{mixed_rate:.2f} it/s; speed-up {mixed_rate / fp32_rate:.2f}x"
    )


if __name__ == "__main__":
    main()
