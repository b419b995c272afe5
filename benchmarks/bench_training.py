"""Training throughput: the real data pipeline vs. batches already in memory (and AMP on CUDA).

Measures, in one run, with the ``cpu`` preset's crop size and batch size (full-size U-Net):

1. iterations/s of :func:`companion.training.step.train_step` fed by the real pipeline
   (:func:`companion.training.batches.make_loader`: ``WormCropDataset`` augmentation in DataLoader
   workers, pinned memory on CUDA) on the BBBC010 training wells if ``$BBBC010_ROOT`` is set,
   else on synthetic 520 x 696 worms;
2. iterations/s of the same model stepping on the same batches already in memory (on the device);
3. their ratio (target >= 0.9: the pipeline keeps the model busy);
4. augmented crops/s of the pipeline in one process (what sizes the ``colab`` preset);
5. on CUDA, the speed-up of bf16/fp16 autocast + channels-last over float32;
6. the objective (``--section objective``): the step time with the batched objective of
   :mod:`companion.training.losses` and with the looped one it replaced (``tests/looped_objective.py``,
   a reference kept beside the tests), for the ``cpu`` preset (batch 1, 512 x 512) and for
   batch 8 at 256 x 256; the aten operators of the objective's forward + backward counted with
   :mod:`torch.profiler` (every event, nested ones included, as the profiler lists them; and the
   top-level calls), with the host-synchronising ones; with ``--curve-iterations N`` the logged
   losses of ``N`` training iterations of the ``cpu`` preset with either objective (same seed);
   with ``--compile`` the step under :func:`torch.compile`. Its last line is
   ``objective ops per step, batch 8 -> 16: <n8> -> <n16>``.

The two paths alternate step by step and their median step times are compared, so that load
from other processes on a shared machine disturbs the ratio as little as possible.

Run: ``OMP_NUM_THREADS=2 python benchmarks/bench_training.py [--iterations 10]``, or
``OMP_NUM_THREADS=1 python benchmarks/bench_training.py --section objective [--curve-iterations 200]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from companion.data.augment import WormCropDataset
from companion.training.batches import make_loader, single_threaded_numpy_blas, to_device
from companion.training.config import TrainConfig
from companion.training.step import autocast_dtype, build_model, train_step


def training_data(n_synthetic: int = 8):
    """BBBC010 training wells when ``$BBBC010_ROOT`` is set, else synthetic wells."""
    if os.environ.get("BBBC010_ROOT"):
        from companion.data.bbbc010 import TRAIN_WELLS, load_bbbc010

        return load_bbbc010(None, TRAIN_WELLS, skip_incomplete=True, progress=False), "BBBC010 train wells"
    from companion.data.synthetic import make_dataset

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


#: Operators that make the host wait for the device (data-dependent output sizes, reads).
SYNCING_OPS = frozenset(
    {
        "aten::nonzero",
        "aten::item",
        "aten::_local_scalar_dense",
        "aten::is_nonzero",
        "aten::masked_select",
        "aten::unique",
        "aten::_unique2",
        "aten::equal",
        "aten::repeat_interleave",
    }
)


def _looped_parts() -> dict:
    """The objective's parts as the package computed them before (a reference kept in tests/)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import looped_objective as looped

    def loss(embeddings, instances, valid=None, **kwargs):
        if valid is not None:  # the padded batch as the list of stacks the loop took
            instances = [masks[keep] for masks, keep in zip(instances, valid)]
        return looped.looped_batched_loss(embeddings, instances, **kwargs)

    return {
        "batched_discriminative_loss": loss,
        "concrete_regularizer": looped.looped_concrete_regularizer,
        "weight_decay_penalty": looped.looped_weight_decay_penalty,
    }


@contextlib.contextmanager
def objective_of(kind: str):
    """Inside the block the training objective is the ``"batched"`` one or the ``"looped"`` one."""
    import companion.training.losses as losses

    parts = _looped_parts() if kind == "looped" else {}
    saved = {name: getattr(losses, name) for name in parts}
    for name, part in parts.items():
        setattr(losses, name, part)
    try:
        yield
    finally:
        for name, part in saved.items():
            setattr(losses, name, part)


def objective_ops(model, batch, n_train: int) -> tuple[int, int, int]:
    """aten operators of one forward + backward of the objective on fixed network outputs:
    ``(all events, top-level calls, host-synchronising events)``."""
    from torch.profiler import ProfilerActivity, profile

    from companion.model.unet import UNetOutput
    from companion.training.losses import training_objective

    with torch.no_grad():
        output = model(batch["image"])
    output = UNetOutput(output.embedding.requires_grad_(), output.logits.requires_grad_())
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        training_objective(model, output, batch, n_train=n_train).total.backward()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(events), len(top), sum(e.name in SYNCING_OPS for e in events)


def _objective_batches(data, config, n: int) -> list[dict]:
    return [
        b
        for _, b in zip(
            range(n), make_loader(data, TrainConfig.from_dict({**config.to_dict(), "num_workers": 0}))
        )
    ]


def objective_section(data, n: int, curve_iterations: int, compile_step: bool) -> None:
    """Step times and operator counts of the objective (one torch thread is assumed).

    Three steps alternate on the same batches: *before* (the looped objective, the network in
    the contiguous NCHW format that the CPU used before), *batched objective* (the same
    network format) and *now* (the batched objective and the channels-last format of
    :func:`companion.training.train.train`).
    """
    from companion.training.step import compiled_objective

    print(
        f"== objective: batched (companion.training.losses) vs looped (the reference it replaced), {n} steps each"
    )
    settings = [
        ("cpu preset, batch 1, 512 x 512", {}),
        ("batch 8, 256 x 256", dict(batch_size=8, crop_size=256)),
    ]
    cpu = torch.device("cpu")
    for label, overrides in settings:
        config = TrainConfig.preset("cpu", iterations=n + 2, **overrides)
        torch.manual_seed(0)
        contiguous = build_model(config)
        channels_last = build_model(config).to(memory_format=torch.channels_last)
        channels_last.load_state_dict(contiguous.state_dict())
        variants = {  # name: (objective, model, optimiser, channels-last batches)
            "before": ("looped", contiguous, False),
            "batched objective": ("batched", contiguous, False),
            "now": ("batched", channels_last, True),
        }
        optimizers = {
            id(m): torch.optim.Adam(m.parameters(), lr=config.lr) for m in (contiguous, channels_last)
        }
        batches = _objective_batches(data, config, n + 2)
        step = dict(n_train=len(data), config=config)
        times = {name: [] for name in variants}
        for i, batch in enumerate(batches):
            for name, (kind, model, last) in variants.items():  # alternating: load hits all alike
                moved = to_device(batch, cpu, last)
                with objective_of(kind):
                    start = time.perf_counter()
                    train_step(model, optimizers[id(model)], moved, **step)
                    if i >= 2:
                        times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(values) for name, values in times.items()}
        print(
            f"{label}: step {median['before'] * 1000:.0f} ms before -> "
            f"{median['batched objective'] * 1000:.0f} ms with the batched objective "
            f"({median['before'] / median['batched objective']:.2f}x) -> {median['now'] * 1000:.0f} ms "
            f"also channels-last ({median['before'] / median['now']:.2f}x)"
        )
        for kind in ("looped", "batched"):
            with objective_of(kind):
                ops, top, syncing = objective_ops(contiguous, batches[0], len(data))
            print(
                f"  {kind:7s} objective forward + backward: {ops} aten ops ({top} top-level), "
                f"{syncing} host-synchronising"
            )
        if compile_step:
            compiled = compiled_objective(TrainConfig.from_dict({**config.to_dict(), "compile": True}))
            model, optimizer = channels_last, optimizers[id(channels_last)]
            start = time.perf_counter()
            train_step(model, optimizer, to_device(batches[0], cpu, True), objective=compiled, **step)
            first = time.perf_counter() - start
            compiled_times = []
            for batch in batches[1:]:
                moved = to_device(batch, cpu, True)
                start = time.perf_counter()
                train_step(model, optimizer, moved, objective=compiled, **step)
                compiled_times.append(time.perf_counter() - start)
            rate = statistics.median(compiled_times[1:])
            print(
                f"  torch.compile: first step {first:.0f} s, then {rate * 1000:.0f} ms "
                f"({median['now'] / rate:.2f}x eager)"
            )
    counts = {}
    for batch_size in (8, 16):
        config = TrainConfig.preset("cpu", batch_size=batch_size, crop_size=256, iterations=1)
        torch.manual_seed(0)
        model = build_model(config)
        batch = _objective_batches(data, config, 1)[0]
        counts[batch_size] = {
            kind: _ops_with(kind, model, batch, len(data)) for kind in ("looped", "batched")
        }
    if curve_iterations:
        loss_curves(data, curve_iterations)
    print(f"objective ops per step, looped, batch 8 -> 16: {counts[8]['looped']} -> {counts[16]['looped']}")
    print(f"objective ops per step, batch 8 -> 16: {counts[8]['batched']} -> {counts[16]['batched']}")


def _ops_with(kind: str, model, batch, n_train: int) -> int:
    with objective_of(kind):
        return objective_ops(model, batch, n_train)[0]


def loss_curves(data, iterations: int, block: int = 50) -> None:
    """The logged losses of the ``cpu`` preset's first ``iterations`` with either objective.

    Two runs that differ only in float rounding drift apart within tens of iterations (the
    early steps amplify differences of 1e-6); so beside the looped and the batched objective
    runs a third: the looped objective in the other memory format, which changes nothing but
    rounding. Printed: the relative difference of the first logged window, and the mean total
    loss of each block of ``block`` iterations for the three runs.
    """
    from companion.training.run_folder import read_log
    from companion.training.train import train

    config = TrainConfig.preset(
        "cpu",
        iterations=iterations,
        log_every=10,
        checkpoint_every=iterations,
        num_workers=0,
        snapshot_every=0,
    )
    runs = {"looped": ("looped", True), "batched": ("batched", True), "looped, NCHW": ("looped", False)}
    logs = {}
    for name, (kind, channels_last) in runs.items():
        run = TrainConfig.from_dict({**config.to_dict(), "channels_last": channels_last})
        with tempfile.TemporaryDirectory() as out, objective_of(kind):
            train(run, data, out, progress=False)
            logs[name] = read_log(out)
    first = {name: log[0]["total"] for name, log in logs.items()}
    print(
        f"loss curves, cpu preset, seed {config.seed}: first {config.log_every} iterations' mean total "
        + ", ".join(f"{name} {value:.6f}" for name, value in first.items())
        + f" (batched vs looped: {abs(first['batched'] / first['looped'] - 1):.1e} relative)"
    )
    per_block = block // config.log_every
    for name, log in logs.items():
        means = [
            statistics.mean(r["total"] for r in log[i : i + per_block]) for i in range(0, len(log), per_block)
        ]
        print(f"  {name:13s} mean total per {block} iterations: " + " ".join(f"{m:.3f}" for m in means))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("all", "pipeline", "objective"), default="all")
    parser.add_argument(
        "--curve-iterations",
        type=int,
        default=0,
        help="loss curves of that many iterations (objective section)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time the step under torch.compile (objective section)"
    )
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations per path")
    parser.add_argument("--preset", default="cpu", help="preset giving crop and batch size")
    parser.add_argument(
        "--num-workers", type=int, default=None, help="DataLoader workers (default: the preset's)"
    )
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data, source = training_data()
    n = args.iterations
    if args.section == "objective":
        print(f"device cpu, {torch.get_num_threads()} torch thread(s), data: {len(data)} {source}")
        objective_section(data, n, args.curve_iterations, args.compile)
        return
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
        if args.section == "all":
            objective_section(data, n, args.curve_iterations, args.compile)
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
    if args.section == "all":
        objective_section(data, n, args.curve_iterations, args.compile)


if __name__ == "__main__":
    main()
