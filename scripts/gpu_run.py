"""One command for a few GPU minutes: benchmark, train, export and evaluate the models, within a budget.

Usage::

    # where the data is, once: the training and test wells as one git-ignored archive (a GPU run
    # may see only the working tree)
    python scripts/gpu_run.py pack --data-root BBBC010_DIR --out data_pack/bbbc010.npz

    # with the GPU (PYTHONPATH=. is enough; pooch is not needed):
    PYTHONPATH=. python scripts/gpu_run.py --out DIR [--budget-s 480]

    # anywhere, end to end on the CPU in a few minutes (tiny network, few iterations and wells):
    python scripts/gpu_run.py --out DIR --smoke

A run, each phase checking the time left first (``--budget-s`` counts from the start of the
process; a phase that no longer fits is skipped and named in the summary):

1. **data**: the fitting wells (``companion.data.FIT_WELLS``), the validation wells
   (``VAL_WELLS``, for calibration) and the complete test wells (``TEST_WELLS``, the paper's two
   folds) from the archive (or synthetic worms with ``--smoke`` when there is no archive);
2. **benchmarks** (~30 s): augmented crops/s of the scipy path (one CPU process) and of the torch
   path on the device; training iterations/s of the ``cpu`` preset's network with GPU
   augmentation at a few batch sizes (bf16 autocast + channels-last), the batch with the best
   crops/s chosen (a smaller one if within 10 %), and fp32 at that batch; Monte-Carlo sampling
   of 8 draws batched vs. sequential on one test well;
3. **training** of the baseline and then of the Concrete Dropout model (``--models``; the
   budget is shared between them), by default a new stage on top of their shipped weights
   (``--init-from shipped``: lr ``3e-4 * sqrt(batch)``, the shipped stages' rate scaled by the
   square-root rule, no cross-entropy warm-up), or from scratch (``--init-from scratch``: lr
   1e-3): the ``cpu`` preset's recipe otherwise (512 x 512 crops, network at half resolution
   unless ``--downsample 1``,
   warm-up and cosine decay, standardised inputs, ``dropout_lr_scale`` 10 for the Concrete
   model; warm-ups scaled down when fewer than its 5 000 iterations fit) at the chosen batch, bf16 autocast,
   channels-last and GPU augmentation; each model gets a share of the time left, and its run
   sizes its own schedule to it (``TrainConfig.time_budget``, as ``train --time-budget``: the
   first steps timed, the cosine schedule ending with the share, a checkpoint at its end
   whatever happens); the benchmark's rate sets only the warm-ups and an upper bound;
4. **export** of each model (``companion.export.export``, fp16 weights + provenance) with the
   background-logit shift chosen on the 10 validation wells as ``scripts/export_pretrained.py
   --calibrate 10`` does (for the Concrete Dropout model on 8 Monte-Carlo draws, agreement
   0.75);
5. **evaluation** of each exported model on the test wells (``companion.evaluate``, the settings
   of the committed ``results/``: bandwidths 1.5 2 3, thresholds 1.5 2 3 4, max 8000 points, 8
   draws), in a child process so that the baseline's evaluation overlaps the Concrete model's
   training; a child that would not finish in time switches to the single grid point 1.5 / 2
   (the committed results' choice), and one still running at the end of the budget is stopped.

``DIR`` receives at most 8 files, each under 16 MiB, written as soon as they exist (a run killed
from outside keeps what it had): ``summary.json`` (every number), ``run.log``, ``baseline.pt`` /
``baseline.json`` and ``concrete.pt`` / ``concrete.json`` (the exported models) and
``baseline_run.zip`` / ``concrete_run.zip`` (training log and evaluation report).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

_PROCESS_START = time.monotonic()
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a GPU run may use the working tree without installing it
    sys.path.insert(0, str(REPO))

if TYPE_CHECKING:  # pragma: no cover
    from companion.data import Sample

#: Where ``pack`` writes the archive and a run looks for it (``data_pack/`` is git-ignored).
DEFAULT_PACK = REPO / "data_pack" / "bbbc010.npz"
#: ``format`` entry of the archive.
PACK_FORMAT = "companion-bbbc010-pack"
PACK_VERSION = 1
#: The archive must travel with the working tree (64 MiB for everything carried).
MAX_PACK_BYTES = 64 * 2**20
#: Limits on what the run leaves in ``--out``.
MAX_OUT_FILES, MAX_OUT_BYTES = 8, 16 * 2**20
MODELS = ("baseline", "concrete")


# --------------------------------------------------------------------------------------------
# The data archive
# --------------------------------------------------------------------------------------------
def _raw_counts(sample: Sample) -> np.ndarray:
    """The raw camera counts ``uint16 (C, H, W)`` behind a loaded image (checked to be exact)."""
    from companion.data import CHANNEL_MAX, normalize

    image = np.asarray(sample.image, dtype=np.float32)
    raw = np.stack([np.rint(np.asarray(ch, np.float64) * CHANNEL_MAX[c]) for c, ch in enumerate(image)])
    if raw.min() < 0 or raw.max() > np.iinfo(np.uint16).max:
        raise ValueError(
            f"well {sample.well}: image values outside [0, 65535 / {CHANNEL_MAX[0]:g}]: cannot pack"
        )
    raw = raw.astype(np.uint16)
    if not all(np.array_equal(normalize(raw[c], c), image[c]) for c in range(len(image))):
        raise ValueError(
            f"well {sample.well}: the image is not raw camera counts / CHANNEL_MAX, so it cannot "
            f"be packed losslessly as uint16"
        )
    return raw


def pack_samples(samples: Sequence[Sample], path: str | os.PathLike, *, note: str = "") -> int:
    """Write samples losslessly to an LZMA-compressed ``.npz``; returns its size in bytes.

    Per well: ``<well>_image`` the raw uint16 counts as two byte planes ``uint8 (2, C, H, W)``
    (high byte first: the high planes hold 4 bits of a 12-bit camera and compress well apart
    from the noisy low ones), ``<well>_masks`` the instance masks bit-packed along the rows
    (:func:`numpy.packbits`) and ``<well>_shape`` ``(K, H, W)``. :func:`numpy.load` reads it
    (zip members compressed with LZMA); no pickles.
    """
    from companion._io import atomic_write

    arrays: dict[str, np.ndarray] = dict(
        format=np.array(PACK_FORMAT),
        version=np.array(PACK_VERSION),
        wells=np.array([s.well for s in samples]),
        note=np.array(note),
    )
    for sample in samples:
        raw = _raw_counts(sample)
        arrays[f"{sample.well}_image"] = np.stack([raw >> 8, raw & 0xFF]).astype(np.uint8)
        masks = np.asarray(sample.instances, dtype=bool)
        arrays[f"{sample.well}_masks"] = np.packbits(masks, axis=-1)
        arrays[f"{sample.well}_shape"] = np.array(masks.shape, dtype=np.int64)

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as archive:
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)

    return atomic_write(path, write).stat().st_size


def pack_wells(path: str | os.PathLike) -> list[str]:
    """The wells an archive holds, in order."""
    with _open_pack(path) as archive:
        return [str(w) for w in archive["wells"]]


def _open_pack(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no data archive at {path}: build it with `python scripts/gpu_run.py pack "
            f"--data-root DIR --out {path}`"
        )
    try:
        archive = np.load(path, allow_pickle=False)
        fmt = str(archive["format"]) if "format" in archive.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path} is not a readable data archive ({type(err).__name__}: {err})") from err
    if fmt != PACK_FORMAT:
        archive.close()
        raise ValueError(f"{path} is not a companion data archive (format {fmt!r}, expected {PACK_FORMAT!r})")
    return archive


def read_pack(path: str | os.PathLike, wells: Iterable[str] | None = None) -> list[Sample]:
    """Samples of an archive, exactly as :func:`companion.data.load_bbbc010` loads them.

    ``wells``: these, in this order (default all); a well the archive lacks raises ``KeyError``
    naming it.
    """
    from companion.data import Sample, normalize

    with _open_pack(path) as archive:
        held = [str(w) for w in archive["wells"]]
        wells = held if wells is None else list(wells)
        missing = [w for w in wells if w not in held]
        if missing:
            raise KeyError(f"{path} holds no well {', '.join(missing)} (it holds {len(held)} wells)")
        samples = []
        for well in wells:
            planes = archive[f"{well}_image"]
            raw = planes[0].astype(np.uint16) << 8 | planes[1]
            image = np.stack([normalize(raw[c], c) for c in range(len(raw))])
            k, height, width = (int(v) for v in archive[f"{well}_shape"])
            masks = np.unpackbits(archive[f"{well}_masks"], axis=-1, count=width).astype(bool)
            samples.append(Sample(well=well, image=image, instances=masks.reshape(k, height, width)))
    return samples


def pack_main(argv: Sequence[str]) -> int:
    """``pack``: the BBBC010 training and test wells into one archive."""
    parser = argparse.ArgumentParser(prog="gpu_run.py pack", description=pack_main.__doc__)
    parser.add_argument("--data-root", default=None, help="BBBC010 folder (default: $BBBC010_ROOT)")
    parser.add_argument("--out", type=Path, default=DEFAULT_PACK, help="archive to write")
    parser.add_argument(
        "--wells",
        nargs="+",
        default=None,
        help="only these wells (default: TRAIN_WELLS + TEST_WELLS, incomplete ones skipped)",
    )
    parser.add_argument("--no-verify", action="store_true", help="do not read the archive back to compare")
    args = parser.parse_args(argv)
    from companion.data import TEST_WELLS, TRAIN_WELLS, load_bbbc010

    wells = list(args.wells or (TRAIN_WELLS + TEST_WELLS))
    start = time.perf_counter()
    samples = load_bbbc010(args.data_root, wells, skip_incomplete=True, progress=True)
    skipped = [w for w in wells if w not in {s.well for s in samples}]
    size = pack_samples(samples, args.out, note=f"skipped incomplete wells: {' '.join(skipped)}")
    print(
        f"packed {len(samples)} wells ({len(skipped)} incomplete skipped: {' '.join(skipped) or '-'}) into "
        f"{args.out}: {size / 2**20:.1f} MiB in {time.perf_counter() - start:.0f} s"
    )
    if not args.no_verify:
        start = time.perf_counter()
        again = read_pack(args.out)
        same = all(
            a.well == b.well and np.array_equal(a.image, b.image) and np.array_equal(a.instances, b.instances)
            for a, b in zip(samples, again)
        ) and len(again) == len(samples)
        if not same:
            print(f"error: {args.out} does not read back as the loaded wells", file=sys.stderr)
            return 1
        print(f"read back identical in {time.perf_counter() - start:.1f} s")
    if size >= MAX_PACK_BYTES:
        print(
            f"error: {args.out} is {size / 2**20:.1f} MiB, over the {MAX_PACK_BYTES / 2**20:.0f} MiB that "
            f"can travel with the working tree",
            file=sys.stderr,
        )
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# Bookkeeping: the budget, the log, the summary
# --------------------------------------------------------------------------------------------
class OutOfTime(Exception):
    """Raised from a training checkpoint callback when the training phase has used its time."""


@dataclass
class Run:
    """The run's output folder, work folder, budget and summary (rewritten after every change)."""

    out: Path
    work: Path
    budget_s: float
    started: float
    summary: dict = field(default_factory=dict)
    _log: list = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, message: str) -> None:
        line = f"[{self.elapsed():6.1f} s] {message}"
        print(line, flush=True)
        with open(self.out / "run.log", "a") as handle:
            handle.write(line + "\n")

    def save(self) -> None:
        from companion._io import atomic_write_bytes

        self.summary["elapsed_s"] = round(self.elapsed(), 1)
        atomic_write_bytes(
            self.out / "summary.json", (json.dumps(_json_safe(self.summary), indent=1) + "\n").encode()
        )

    def phase(self, name: str, status: str, started: float, **details: Any) -> None:
        self.summary.setdefault("phases", {})[name] = dict(
            status=status, seconds=round(time.monotonic() - started, 1), **details
        )
        self.save()

    def fits(self, name: str, needed_s: float) -> bool:
        """Whether ``needed_s`` seconds are left; else the phase is recorded as skipped."""
        if self.left() >= needed_s:
            return True
        self.skip(name, needed_s)
        return False

    def skip(self, name: str, needed_s: float) -> None:
        """Record that phase ``name`` (needing ``needed_s`` seconds) did not fit in the budget."""
        self.log(f"skipping {name}: {self.left():.0f} s left, it needs ~{needed_s:.0f} s")
        self.summary.setdefault("phases", {})[name] = dict(
            status="skipped", reason="budget", left_s=round(self.left(), 1)
        )
        self.save()


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.ndarray,)):
        return _json_safe(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """What a run does; :func:`settings_for` gives the full and the smoke settings."""

    smoke: bool
    device: str
    n_train: int | None  # None: all FIT_WELLS
    n_val: int
    test_per_fold: int | None  # None: all complete test wells
    overrides: dict  # of the cpu preset, besides iterations / batch / model
    batch_candidates: tuple[int, ...]
    bench_slice_s: float
    draws: int
    bandwidths: tuple[float, ...]
    thresholds: tuple[float, ...]
    fallback_grid: tuple[float, float]
    max_points: int
    max_iterations: int | None
    min_iterations: int
    min_train_s: float
    export_reserve_s: float
    eval_reserve_s: float
    pack_reserve_s: float
    synthetic_shape: tuple[int, int]


def settings_for(smoke: bool, device: str) -> Settings:
    """The settings of a full run (BBBC010 on a GPU) or of a smoke run (tiny, on the CPU)."""
    if smoke:
        return Settings(
            smoke=True,
            device=device,
            n_train=3,
            n_val=1,
            test_per_fold=1,
            overrides=dict(crop_size=64, base_filters=4, embedding_dim=8),
            batch_candidates=(2,),
            bench_slice_s=0.5,
            draws=2,
            bandwidths=(1.5,),
            thresholds=(2.0,),
            fallback_grid=(1.5, 2.0),
            max_points=2000,
            max_iterations=4,
            min_iterations=2,
            min_train_s=0.5,
            export_reserve_s=10,
            eval_reserve_s=30,
            pack_reserve_s=5,
            synthetic_shape=(128, 128),
        )
    return Settings(
        smoke=False,
        device=device,
        n_train=None,
        n_val=10,
        test_per_fold=None,
        overrides={},
        batch_candidates=(8, 16, 32),
        bench_slice_s=4.0,
        draws=8,
        bandwidths=(1.5, 2.0, 3.0),
        thresholds=(1.5, 2.0, 3.0, 4.0),
        fallback_grid=(1.5, 2.0),
        max_points=8000,
        max_iterations=None,
        min_iterations=50,
        min_train_s=20,
        export_reserve_s=25,
        eval_reserve_s=110,
        pack_reserve_s=10,
        synthetic_shape=(520, 696),
    )


#: Learning rate of the shipped models' later stages (batch 1); a stage on top of them at batch
#: ``B`` uses ``CONTINUE_LR * sqrt(B)`` (results/gpu/batch_sweep.csv: batches 1-16 at equal crops).
CONTINUE_LR = 3e-4


def train_config(
    settings: Settings, model: str, iterations: int, batch: int, *, init_from: str | None = None, **extra: Any
):
    """The ``cpu`` preset's recipe for a GPU run of ``iterations`` steps of ``batch`` crops.

    With ``init_from`` (a shipped model's name or a checkpoint) a new stage on top of those
    weights: learning rate ``CONTINUE_LR * sqrt(batch)``, no cross-entropy warm-up, and the
    architecture of the full network (the smoke settings' tiny one would not fit the weights).
    """
    from companion.config import PRESETS, TrainConfig

    cpu = PRESETS["cpu"]
    scale = min(1.0, iterations / cpu["iterations"])  # warm-ups in proportion when fewer iterations fit
    overrides = dict(settings.overrides)
    if init_from is not None:
        overrides = {
            k: v for k, v in overrides.items() if k not in ("base_filters", "embedding_dim", "depth")
        }
        extra = dict(init_from=init_from, lr=CONTINUE_LR * math.sqrt(batch), disc_warmup=0, **extra)
    values = dict(
        model=model,
        iterations=iterations,
        batch_size=batch,
        device=settings.device,
        amp=True,
        channels_last=True,
        gpu_augment=True,
        num_workers=0,
        snapshot_every=0,
        disc_warmup=int(round(cpu["disc_warmup"] * scale)),
        lr_warmup=int(round(cpu["lr_warmup"] * scale)),
        checkpoint_every=max(1, iterations // 10),
        log_every=max(1, iterations // 50),
        dropout_lr_scale=10.0 if model == "concrete" else 1.0,
        **overrides,
    )
    values.update(extra)
    return TrainConfig.preset("cpu", **values)


def init_source_of(init_from: str, name: str) -> str | None:
    """What model ``name`` starts from: ``"shipped"`` its shipped weights, ``"scratch"`` nothing,
    anything else that model, name or path, for every model."""
    if init_from == "scratch":
        return None
    return name if init_from == "shipped" else init_from


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
@dataclass
class Data:
    train: list
    val: list
    test: list
    folds: list
    source: dict  # how to load the test wells again (the evaluation child)


def _synthetic_data(settings: Settings) -> Data:
    from companion.synthetic import make_dataset

    shape = settings.synthetic_shape
    n_test = 2 * (settings.test_per_fold or 4)
    train = make_dataset(settings.n_train or 8, seed=0, shape=shape)
    val = make_dataset(settings.n_val, seed=1000, shape=shape)
    test = make_dataset(n_test, seed=2000, shape=shape)
    wells = [s.well for s in test]
    return Data(
        train,
        val,
        test,
        [wells[0::2], wells[1::2]],
        dict(kind="synthetic", n=n_test, seed=2000, shape=list(shape)),
    )


def _pack_data(settings: Settings, pack: Path) -> Data:
    from companion.data import FIT_WELLS, TEST_FOLDS, VAL_WELLS

    held = set(pack_wells(pack))
    fit = [w for w in FIT_WELLS if w in held][: settings.n_train]
    val = [w for w in VAL_WELLS if w in held][: settings.n_val]
    folds = [[w for w in fold if w in held][: settings.test_per_fold] for fold in TEST_FOLDS]
    if not fit or not val or not all(folds):
        raise ValueError(
            f"{pack} lacks fitting, validation or test wells of both folds (it holds {len(held)} wells)"
        )
    test_wells = [w for fold in folds for w in fold]
    samples = read_pack(pack, fit + val + test_wells)
    train, val_s, test = (
        samples[: len(fit)],
        samples[len(fit) : len(fit) + len(val)],
        samples[len(fit) + len(val) :],
    )
    return Data(train, val_s, test, folds, dict(kind="pack", path=str(pack), wells=test_wells))


def load_data(run: Run, settings: Settings, pack: Path | None) -> Data:
    started = time.monotonic()
    if pack is not None:
        data = _pack_data(settings, pack)
    else:
        data = _synthetic_data(settings)
    described = dict(
        source=data.source["kind"],
        path=str(pack) if pack else None,
        train=len(data.train),
        val=len(data.val),
        test=len(data.test),
        folds=data.folds,
        image_shape=list(data.train[0].image.shape),
    )
    run.summary["data"] = described
    run.phase("data", "done", started)
    run.log(
        f"data ({data.source['kind']}): {len(data.train)} fitting, {len(data.val)} validation, "
        f"{len(data.test)} test wells"
    )
    return data


def load_source_samples(source: dict, wells: Sequence[str]) -> list:
    """The test samples again, in the evaluation child."""
    if source["kind"] == "pack":
        return read_pack(source["path"], wells)
    from companion.synthetic import make_dataset

    samples = make_dataset(source["n"], seed=source["seed"], shape=tuple(source["shape"]))
    by_well = {s.well: s for s in samples}
    return [by_well[w] for w in wells]


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _rate(step: Callable[[], None], device, seconds: float, *, warmup: int = 2, min_steps: int = 3) -> float:
    """Steps per second of ``step`` over about ``seconds`` (after ``warmup`` untimed steps)."""
    for _ in range(warmup):
        step()
    _sync(device)
    start, done = time.perf_counter(), 0
    while done < min_steps or time.perf_counter() - start < seconds:
        step()
        done += 1
    _sync(device)
    return done / (time.perf_counter() - start)


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_augment", REPO / "benchmarks" / "bench_augment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_training(
    data: Data, settings: Settings, source, batch: int, *, mixed: bool, seconds: float
) -> float:
    """Training iterations/s (crops from ``source`` on the device + one ``train_step``), Concrete model."""
    import torch

    from companion.batches import to_device
    from companion.step import autocast_dtype, build_model, make_optimizer, train_step

    device = torch.device(settings.device)
    config = train_config(
        settings, "concrete", 1000, batch, cpu_bf16=mixed and device.type == "cpu", amp=mixed
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train() does; the tuned kernels are kept for it
    torch.manual_seed(0)
    model = build_model(config).to(device)
    channels_last = mixed
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    amp_dtype = autocast_dtype(config, device) if mixed else None
    generator = torch.Generator().manual_seed(0)
    counter = iter(range(10**9))

    def step() -> None:
        first = next(counter) * batch
        batch_ = source.crops([(first + j) % len(source) for j in range(batch)], generator)
        terms = train_step(
            model,
            optimizer,
            to_device(batch_, device, channels_last),
            n_train=len(data.train),
            config=config,
            amp_dtype=amp_dtype,
        )
        float(terms.total)  # the training loop syncs on the loss every step too

    try:
        return _rate(step, device, seconds)
    finally:
        del step  # the closure holds the model and optimizer; drop it before freeing the cache
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_mc(data: Data, settings: Settings, draws: int, repeats: int = 2) -> dict:
    """Seconds for ``draws`` Monte-Carlo draws of one test well, batched and one at a time."""
    import torch

    from companion.model import UNet
    from companion.sampling import mc_predict

    device = torch.device(settings.device)
    torch.manual_seed(0)
    config = train_config(settings, "concrete", 1000, 1)
    model = UNet(**config.model_kwargs()).to(device).eval()
    image = data.test[0].image
    timings = {}
    for name, batch in (("batched", draws), ("sequential", 1)):
        mc_predict(model, image, n_draws=draws, batch=batch, device=device, seed=0)  # warm-up
        best = math.inf
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            mc_predict(model, image, n_draws=draws, batch=batch, device=device, seed=0)
            _sync(device)
            best = min(best, time.perf_counter() - start)
        timings[f"{name}_s"] = best
    timings.update(
        draws=draws, image_shape=list(image.shape), speedup=timings["sequential_s"] / timings["batched_s"]
    )
    return timings


def run_benchmarks(run: Run, data: Data, settings: Settings) -> tuple[int, float]:
    """All benchmarks; returns the chosen batch and its training iterations/s."""
    import torch

    started = time.monotonic()
    device = torch.device(settings.device)
    bench = _bench_module()
    slice_s = settings.bench_slice_s
    crop = train_config(settings, "concrete", 1000, 1).crop_size
    results: dict[str, Any] = {}
    run.summary["benchmarks"] = results
    few = data.train[:4]
    results["augmentation"] = aug = dict(
        crop_size=crop,
        scipy_cpu_crops_per_s=bench.scipy_crops_per_s(few, crop, 10**6, max_seconds=slice_s / 2),
    )
    aug[f"torch_{device.type}_crops_per_s"] = bench.torch_crops_per_s(
        few, crop, 10**6, batch=max(settings.batch_candidates), device=device, max_seconds=slice_s / 2
    )
    aug["ratio_torch_to_scipy"] = aug[f"torch_{device.type}_crops_per_s"] / aug["scipy_cpu_crops_per_s"]
    run.log(
        f"augmentation: scipy {aug['scipy_cpu_crops_per_s']:.1f} crops/s (one CPU process), torch on "
        f"{device.type} {aug[f'torch_{device.type}_crops_per_s']:.1f} crops/s"
    )
    run.save()

    from companion.augment_torch import DeviceCropSource

    source = DeviceCropSource(data.train, crop_size=crop, device=device)  # as make_loader makes it
    per_batch = {}
    for batch in settings.batch_candidates:
        if not run.fits(f"benchmark batch {batch}", 2 * slice_s):
            break
        try:
            rate = bench_training(data, settings, source, batch, mixed=True, seconds=slice_s)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            run.log(f"batch {batch}: out of GPU memory")
            break
        per_batch[batch] = dict(it_per_s=rate, crops_per_s=rate * batch)
        run.log(
            f"training, bf16 + channels-last, batch {batch}: {rate:.2f} it/s = {rate * batch:.1f} crops/s"
        )
    if not per_batch:
        raise RuntimeError("no training benchmark fitted in the budget")
    best = max(v["crops_per_s"] for v in per_batch.values())
    batch = min(b for b, v in per_batch.items() if v["crops_per_s"] >= 0.9 * best)
    training = dict(
        mixed_by_batch=per_batch,
        chosen_batch=batch,
        mixed_it_per_s=per_batch[batch]["it_per_s"],
        mixed="bf16 autocast + channels-last" if device.type == "cuda" else "cpu_bf16 + channels-last",
    )
    results["training"] = training
    if run.fits("benchmark fp32", 2 * slice_s):
        training["fp32_it_per_s"] = bench_training(
            data, settings, source, batch, mixed=False, seconds=slice_s
        )
        training["speedup_mixed_over_fp32"] = training["mixed_it_per_s"] / training["fp32_it_per_s"]
        run.log(
            f"training, fp32, batch {batch}: {training['fp32_it_per_s']:.2f} it/s "
            f"(mixed precision {training['speedup_mixed_over_fp32']:.2f}x)"
        )
    run.save()
    if run.fits("benchmark mc", 2 * slice_s):
        results["mc_sampling"] = mc = bench_mc(data, settings, settings.draws)
        run.log(
            f"MC sampling, {mc['draws']} draws of a {mc['image_shape'][1]} x {mc['image_shape'][2]} well: "
            f"batched {mc['batched_s']:.3f} s, sequential {mc['sequential_s']:.3f} s ({mc['speedup']:.2f}x)"
        )
    del source
    if device.type == "cuda":
        torch.cuda.empty_cache()
    run.phase("benchmarks", "done", started)
    # the rate training will see: mixed precision on CUDA; on the CPU the run trains in fp32
    rate = (
        training["mixed_it_per_s"]
        if device.type == "cuda"
        else training.get("fp32_it_per_s", training["mixed_it_per_s"])
    )
    return batch, rate


# --------------------------------------------------------------------------------------------
# Training, export, evaluation
# --------------------------------------------------------------------------------------------
def train_one(
    run: Run,
    data: Data,
    settings: Settings,
    name: str,
    batch: int,
    it_per_s: float,
    seconds: float,
    init_from: str | None = None,
) -> Path | None:
    """Train ``name`` (from scratch, or a stage on top of ``init_from``) for about ``seconds``;
    the checkpoint to export, or None."""
    from companion.checkpoint import load_model, read_checkpoint
    from companion.dropout import dropout_rates
    from companion.run_folder import read_log
    from companion.train import train

    started = time.monotonic()
    iterations = max(settings.min_iterations, int(it_per_s * seconds * 0.9))
    if settings.max_iterations:
        iterations = min(iterations, settings.max_iterations)
    config = train_config(settings, name, iterations, batch, init_from=init_from)
    stop_at = time.monotonic() + seconds  # checked at each checkpoint
    if seconds >= 1:  # the schedule sized to the seconds by the run itself (train --time-budget)
        cap = settings.max_iterations or 4 * iterations  # the benchmark's rate only bounds it
        config = type(config).from_dict({**config.to_dict(), "iterations": cap, "time_budget": seconds / 60})
        stop_at += 0.05 * seconds + 2  # then only a guard: the budget stops the run before
    folder = run.work / name / "train"
    info: dict[str, Any] = dict(
        planned_iterations=iterations, planned_s=round(seconds, 1), batch_size=batch, config=config.to_dict()
    )
    run.summary.setdefault("models", {}).setdefault(name, {})["training"] = info
    start = f"from {init_from}" if init_from else "from scratch"
    run.log(f"training {name} {start}: ~{iterations} iterations of batch {batch} expected in {seconds:.0f} s")

    def on_checkpoint(iteration: int, path: Path) -> None:
        if time.monotonic() > stop_at and iteration < config.iterations:
            raise OutOfTime(iteration)

    checkpoint = folder / "final.pt"
    try:
        train(
            config,
            data.train,
            folder,
            progress=False,
            on_checkpoint=on_checkpoint,
            started=time.perf_counter(),
        )
        status = "done"
    except OutOfTime as stop:
        checkpoint, status = folder / "last.pt", "stopped"
        run.log(f"{name}: out of time, stopped at iteration {stop.args[0]} of {iterations}")
    except (FloatingPointError, RuntimeError, ValueError) as err:
        run.log(f"{name}: training failed: {err}")
        checkpoint, status = folder / "last.pt", "failed"
        info["error"] = str(err)
    if not checkpoint.is_file():
        run.phase(f"train {name}", "failed", started)
        return None
    records = read_log(folder) if (folder / "log.jsonl").is_file() else []
    seconds_used = time.monotonic() - started
    done = int(read_checkpoint(checkpoint)["iteration"])
    info.update(
        iterations=done,
        seconds=round(seconds_used, 1),
        it_per_s=done / seconds_used,
        crops_per_s=done * batch / seconds_used,
        stopped_early=status == "stopped",
        final_loss={k: records[-1][k] for k in ("total", "var", "dist", "reg", "ce")} if records else None,
        dropout_rates=dropout_rates(load_model(checkpoint)),
    )
    run.phase(f"train {name}", status, started)
    last = f", loss {records[-1]['total']:.4g}" if records else ""
    run.log(
        f"trained {name}: {done} iterations in {seconds_used:.0f} s ({done / seconds_used:.2f} it/s{last})"
    )
    return checkpoint


def export_one(run: Run, data: Data, settings: Settings, name: str, checkpoint: Path) -> Path | None:
    """Calibrate on the validation wells and export; copies ``name.pt`` / ``.json`` into ``out``."""
    import torch

    from companion.calibration import choose_background_shift
    from companion.checkpoint import load_model
    from companion.export import export

    started = time.monotonic()
    device = torch.device(settings.device)
    draws = settings.draws if name == "concrete" else 0
    model = load_model(checkpoint).to(device)
    choice = choose_background_shift(model, data.val, draws=draws, agreement=0.75, device=device)
    del model
    method = "foreground pixel F1 on validation wells"
    if draws:
        method += f", of the pixels foreground in >= 0.75 of {draws} Monte-Carlo draws (seed 0)"
    calibration = dict(
        method=method,
        wells=choice.wells,
        shifts=choice.shifts.tolist(),
        f1=[round(float(f), 5) for f in choice.f1],
    )
    command = f"python scripts/gpu_run.py --out DIR --budget-s {run.budget_s:g}" + (
        " --smoke" if settings.smoke else ""
    )
    folder = run.work / "models"
    weights, provenance = export(
        checkpoint, name, folder, command=command, background_shift=choice.shift, calibration=calibration
    )
    for path in (weights, provenance):
        shutil.copyfile(path, run.out / path.name)
    run.summary["models"][name]["export"] = dict(
        background_shift=choice.shift,
        f1=float(choice.f1.max()),
        f1_unshifted=float(choice.f1[0]),
        wells=choice.wells,
        draws=draws,
        size_bytes=weights.stat().st_size,
    )
    run.phase(f"export {name}", "done", started)
    run.log(
        f"exported {name}: background shift {choice.shift:g} (foreground F1 {choice.f1.max():.3f}, "
        f"{choice.f1[0]:.3f} without) on {len(choice.wells)} validation wells"
    )
    return folder


def start_evaluation(
    run: Run, data: Data, settings: Settings, name: str, model_dir: Path
) -> subprocess.Popen:
    """Evaluate ``name`` on the test wells in a child process (see :func:`evaluate_worker`)."""
    folder = run.work / name / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    spec = dict(
        name=name,
        model_dir=str(model_dir),
        source=data.source,
        wells=[s.well for s in data.test],
        folds=data.folds,
        draws=settings.draws if name == "concrete" else 0,
        bandwidths=list(settings.bandwidths),
        thresholds=list(settings.thresholds),
        fallback_grid=list(settings.fallback_grid),
        max_points=settings.max_points,
        device=settings.device,
        deadline_unix=time.time() + run.left() - settings.pack_reserve_s,
        out=str(folder),
    )
    (folder / "spec.json").write_text(json.dumps(spec, indent=1))
    env = dict(
        os.environ,
        MPLBACKEND="Agg",
        PYTHONPATH=os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ),
    )
    run.log(f"evaluating {name} on {len(data.test)} test wells in a child process")
    run.summary["models"][name]["evaluation"] = dict(status="running", started_s=round(run.elapsed(), 1))
    run.save()
    with open(folder / "worker.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_evaluate", str(folder / "spec.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO),
        )


def finish_evaluation(run: Run, settings: Settings, name: str, child: subprocess.Popen) -> None:
    """Wait for an evaluation child until the budget ends (then stop it); record its rows."""
    started = time.monotonic()
    info = run.summary["models"][name]["evaluation"]
    try:
        child.wait(timeout=max(1.0, run.left() - settings.pack_reserve_s))
    except subprocess.TimeoutExpired:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        run.log(f"evaluation of {name} stopped: the budget ran out")
    folder = run.work / name / "eval"
    result = folder / "worker.json"
    if child.returncode == 0 and result.is_file():
        info.update(json.loads(result.read_text()), status="done")
        rows = ", ".join(f"{r['name']} avAP {r['avAP']:.3f} AP50 {r['AP50']:.3f}" for r in info["rows"])
        run.log(f"evaluated {name}: {rows} ({info['seconds']:.0f} s)")
    else:
        tail = (
            (folder / "worker.log").read_text().strip().splitlines()[-3:]
            if (folder / "worker.log").is_file()
            else []
        )
        info.update(
            status="failed" if child.returncode not in (None, -15, -9) else "stopped",
            returncode=child.returncode,
            log_tail=tail,
        )
        run.log(f"evaluation of {name} did not finish (exit {child.returncode}): {' | '.join(tail)}")
    run.phase(f"evaluate {name}", info["status"], started)
    write_model_zip(run, name)


def balanced_subset(samples: Sequence[Sample], folds: Sequence[Sequence[str]], n: int) -> list:
    """``n`` of ``samples`` taken from the folds in turn (each fold keeps at least one well).

    >>> from types import SimpleNamespace as S
    >>> [s.well for s in balanced_subset([S(well=w) for w in "abcde"], [["a", "b", "c"], ["d", "e"]], 3)]
    ['a', 'd', 'b']
    """
    by_well = {s.well: s for s in samples}
    queues = [[w for w in fold if w in by_well] for fold in folds]
    chosen: list[str] = []
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return [by_well[w] for w in chosen]


def evaluate_worker(spec_path: str) -> int:
    """``_evaluate SPEC``: the child process of :func:`start_evaluation`."""
    import torch

    from companion import pretrained
    from companion.evaluate import evaluate_model
    from companion.outputs import cached_well_outputs, has_concrete_dropout
    from companion.predict import predict_agglomerated, predict_deterministic
    from companion.report import write_report

    started = time.time()
    spec = json.loads(Path(spec_path).read_text())
    device = torch.device(spec["device"])
    model = pretrained.load(spec["name"], directory=spec["model_dir"], map_location=device)
    samples = load_source_samples(spec["source"], spec["wells"])
    draws = spec["draws"] if has_concrete_dropout(model) else 0
    segment = dict(max_points=spec["max_points"], clustering="global")
    # time one well at one grid point, then keep the full grid only if it fits
    probe_start = time.time()
    probe = cached_well_outputs(model, samples[:1], None, draws=draws, device=device, progress=False)
    network_s = time.time() - probe_start
    outputs = probe[samples[0].well]
    bandwidth, threshold = spec["fallback_grid"]
    clock = time.time()
    predict_deterministic(outputs, bandwidth, threshold, **segment)
    det_s = time.time() - clock
    clock = time.time()
    if draws:
        predict_agglomerated(outputs, bandwidth, threshold, **segment)
    mc_s = time.time() - clock
    grid = len(spec["bandwidths"]) * len(spec["thresholds"])
    estimate = len(samples) * (network_s + grid * det_s + mc_s) * 1.3
    left = spec["deadline_unix"] - time.time()
    bandwidths, thresholds = spec["bandwidths"], spec["thresholds"]
    if estimate > 0.8 * left:
        bandwidths, thresholds = [bandwidth], [threshold]
        per_well = (network_s + det_s + mc_s) * 1.3
        if len(samples) * per_well > 0.8 * left:  # not even one grid point for all wells: fewer wells
            samples = balanced_subset(samples, spec["folds"], max(2, int(0.8 * left / per_well)))
    print(
        f"probe: network {network_s:.2f} s, segment {det_s:.2f} s, MC {mc_s:.2f} s per well; full grid "
        f"~{estimate:.0f} s of {left:.0f} s left: grid {bandwidths} x {thresholds}, {len(samples)} of "
        f"{len(spec['wells'])} wells",
        flush=True,
    )
    result = evaluate_model(
        model,
        samples,
        folds=spec["folds"],
        bandwidths=bandwidths,
        thresholds=thresholds,
        draws=draws,
        max_points=spec["max_points"],
        device=device,
        progress=False,
    )
    info = dict(
        command=f"scripts/gpu_run.py _evaluate ({spec['name']})",
        model=dict(name=spec["name"]),
        data=spec["source"],
        device=str(device),
        wall_time_s=time.time() - started,
    )
    files = write_report(result, samples, spec["out"], info=info)
    summary = dict(
        rows=[{k: v for k, v in row.items()} for row in result.rows],
        grid=dict(bandwidths=bandwidths, thresholds=thresholds, full_grid_estimate_s=round(estimate, 1)),
        choices=[
            dict(applied_to=c.applied_to, bandwidth=c.bandwidth, threshold=c.threshold)
            for c in result.tuning.choices
        ],
        wells=len(samples),
        wells_planned=len(spec["wells"]),
        draws=draws,
        seconds=time.time() - started,
        files=[p.name for p in files],
    )
    Path(spec["out"], "worker.json").write_text(json.dumps(_json_safe(summary), indent=1))
    print(f"done in {summary['seconds']:.0f} s", flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------
def write_model_zip(run: Run, name: str) -> None:
    """``out/<name>_run.zip``: the training log and the evaluation report (figures dropped if too big)."""
    from companion._io import atomic_write

    base = run.work / name
    files = [
        p
        for p in sorted(base.rglob("*"))
        if p.is_file() and p.suffix in (".jsonl", ".json", ".csv", ".png", ".log")
    ]
    for skip_png in (False, True):
        chosen = [p for p in files if not (skip_png and p.suffix == ".png")]

        def write(tmp: str, chosen: list[Path] = chosen) -> None:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for path in chosen:
                    archive.write(path, path.relative_to(base))

        target = atomic_write(run.out / f"{name}_run.zip", write)
        if target.stat().st_size < MAX_OUT_BYTES:
            return
    run.log(f"{name}_run.zip is over {MAX_OUT_BYTES / 2**20:.0f} MiB even without figures")


def check_out(run: Run) -> list[dict]:
    files = sorted(p for p in run.out.iterdir() if p.is_file())
    listing = [dict(name=p.name, bytes=p.stat().st_size) for p in files]
    if len(files) > MAX_OUT_FILES or any(f["bytes"] >= MAX_OUT_BYTES for f in listing):  # pragma: no cover
        run.log(
            f"warning: {run.out} holds {len(files)} files, largest {max(f['bytes'] for f in listing) / 2**20:.1f} MiB "
            f"(limits: {MAX_OUT_FILES} files under {MAX_OUT_BYTES / 2**20:.0f} MiB)"
        )
    return listing


def print_summary(run: Run) -> None:
    s = run.summary
    lines = [
        "",
        "=" * 78,
        f"gpu_run summary ({s.get('status')}, {run.elapsed():.0f} s of {run.budget_s:.0f} s, "
        f"{s.get('environment', {}).get('device_name')})",
    ]
    bench = s.get("benchmarks", {})
    if "augmentation" in bench:
        aug = bench["augmentation"]
        lines.append(
            "augmentation crops/s: "
            + ", ".join(
                f"{k.replace('_crops_per_s', '')} {v:.1f}"
                for k, v in aug.items()
                if k.endswith("crops_per_s")
            )
        )
    if "training" in bench:
        tr = bench["training"]
        lines.append(
            f"training it/s at batch {tr['chosen_batch']}: mixed {tr['mixed_it_per_s']:.2f}"
            + (
                f", fp32 {tr['fp32_it_per_s']:.2f} ({tr['speedup_mixed_over_fp32']:.2f}x)"
                if "fp32_it_per_s" in tr
                else ""
            )
        )
    if "mc_sampling" in bench:
        mc = bench["mc_sampling"]
        lines.append(
            f"MC {mc['draws']} draws: batched {mc['batched_s']:.3f} s, sequential {mc['sequential_s']:.3f} s "
            f"({mc['speedup']:.2f}x)"
        )
    for name, model in s.get("models", {}).items():
        tr, ex, ev = model.get("training", {}), model.get("export", {}), model.get("evaluation", {})
        if "iterations" in tr:
            lines.append(
                f"{name}: {tr['iterations']} iterations x {tr['batch_size']} crops in {tr['seconds']:.0f} s"
                + (" (stopped early)" if tr.get("stopped_early") else "")
                + (f", shift {ex['background_shift']:g}" if ex else "")
            )
        for row in ev.get("rows", []):
            lines.append(
                f"  {row['name']:<14} avAP {row['avAP']:.3f}  AP50 {row['AP50']:.3f}  AP75 {row['AP75']:.3f}"
            )
        if ev and ev.get("status") != "done":
            lines.append(f"  evaluation: {ev.get('status')}")
    skipped = [k for k, v in s.get("phases", {}).items() if v.get("status") != "done"]
    if skipped:
        lines.append("not done: " + ", ".join(f"{k} ({s['phases'][k]['status']})" for k in skipped))
    lines.append(
        "files: " + ", ".join(f"{f['name']} ({f['bytes'] / 2**20:.1f} MiB)" for f in s.get("files", []))
    )
    lines.append("=" * 78)
    for line in lines:
        run.log(line)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def _environment(device: str) -> dict:
    import platform

    import torch

    info = dict(
        python=platform.python_version(),
        torch=str(torch.__version__),
        cpu_count=os.cpu_count(),
        device=device,
        device_name=torch.cuda.get_device_name(0)
        if torch.cuda.is_available() and device.startswith("cuda")
        else "CPU",
    )
    if info["device_name"] != "CPU":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu_memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}"
        )
    return info


def _terminate(signum, frame) -> None:  # a SIGTERM from outside: unwind, keep what we have
    raise SystemExit(128 + signum)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark, train, export and evaluate the baseline and the Concrete Dropout model on one "
        "GPU within a time budget (`gpu_run.py pack ...` builds the data archive first).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the (at most 8) result files")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock seconds for everything")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny network, few iterations, 2-3 wells, 2 draws: an end-to-end check on the CPU",
    )
    parser.add_argument(
        "--pack",
        type=Path,
        default=None,
        help=f"data archive (default {DEFAULT_PACK.relative_to(REPO)}; with --smoke and no "
        f"archive: synthetic worms)",
    )
    parser.add_argument("--synthetic", action="store_true", help="synthetic worms even if an archive exists")
    parser.add_argument("--device", default=None, help="default: cuda when present (cpu with --smoke)")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        default=list(MODELS),
        help="the models to train, export and evaluate (one may take the whole budget)",
    )
    parser.add_argument(
        "--init-from",
        default="shipped",
        metavar="NAME",
        help="shipped: each model continues from the package's shipped weights (a new stage on top "
        "of their CPU training); scratch: fresh weights; or a shipped model's name or a checkpoint "
        "for every model",
    )
    parser.add_argument(
        "--downsample",
        type=int,
        choices=(1, 2),
        default=2,
        help="internal resolution of the U-Net: 2 as the shipped models were trained (half "
        "resolution inside), 1 the paper's full resolution (about 3x the cost of a step)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for checkpoints and evaluation files (default: a new temporary folder)",
    )
    return parser


def main(argv: Sequence[str] | None = None, *, started: float | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pack"]:
        return pack_main(argv[1:])
    if argv[:1] == ["_evaluate"]:
        return evaluate_worker(argv[1])
    args = build_parser().parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    settings = settings_for(args.smoke, device)
    if args.downsample != 2:  # the cpu preset's; the weights fit either (only the input is pooled)
        settings = replace(settings, overrides={**settings.overrides, "downsample": args.downsample})
    pack = None if args.synthetic else (args.pack or DEFAULT_PACK)
    if pack is not None and not pack.is_file():
        if args.pack is not None or not args.smoke:
            print(
                f"error: no data archive at {pack}: build it with `python scripts/gpu_run.py pack --data-root "
                f"DIR --out {pack}` (or pass --smoke for synthetic worms)",
                file=sys.stderr,
            )
            return 2
        pack = None
    args.out.mkdir(parents=True, exist_ok=True)
    if any(args.out.iterdir()):
        print(f"error: {args.out} is not empty; choose an empty folder", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_run_"))
    run = Run(args.out, work, args.budget_s, started if started is not None else time.monotonic())
    run.summary.update(
        status="running",
        smoke=args.smoke,
        budget_s=args.budget_s,
        work=str(work),
        environment=_environment(device),
    )
    previous = signal.signal(signal.SIGTERM, _terminate)
    children: dict[str, subprocess.Popen] = {}
    try:
        run.log(
            f"gpu_run on {run.summary['environment']['device_name']} (torch {torch.__version__}), budget "
            f"{args.budget_s:.0f} s, work folder {work}"
        )
        _run_phases(run, settings, pack, children, args.models, args.init_from)
        run.summary["status"] = (
            "complete"
            if all(v.get("status") == "done" for v in run.summary.get("phases", {}).values())
            else "partial"
        )
    except SystemExit:
        run.summary["status"] = "terminated"
        raise
    except Exception as err:  # keep what we have, say what broke
        run.summary.update(status="failed", error=f"{type(err).__name__}: {err}")
        run.log(f"error: {type(err).__name__}: {err}")
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
        signal.signal(signal.SIGTERM, previous)
        run.summary["files"] = check_out(run)
        run.save()
        print_summary(run)
        run.summary["files"] = check_out(run)
        run.save()
    return 0 if run.summary["status"] in ("complete", "partial") else 1


def _run_phases(
    run: Run,
    settings: Settings,
    pack: Path | None,
    children: dict,
    models: Sequence[str] = MODELS,
    init_from: str = "shipped",
) -> None:
    data = load_data(run, settings, pack)
    if not run.fits("benchmarks", 5 * settings.bench_slice_s):
        return
    batch, it_per_s = run_benchmarks(run, data, settings)
    # after the Concrete model's training: its export, its evaluation and the packing (the
    # baseline's export comes between the trainings, its evaluation overlaps the second one)
    tail = settings.export_reserve_s + settings.eval_reserve_s + settings.pack_reserve_s
    models = [m for m in MODELS if m in models]
    run.summary["plan"] = dict(
        per_model_training_s=round(
            (run.left() - tail - (len(models) - 1) * settings.export_reserve_s) / len(models), 1
        ),
        reserved_tail_s=tail,
        batch=batch,
        it_per_s=it_per_s,
        models=models,
        init_from=init_from,
    )
    for index, name in enumerate(models):
        later = len(models) - index - 1  # models still to train after this one share what is left
        seconds = (run.left() - tail - later * settings.export_reserve_s) / (later + 1)
        if seconds < settings.min_train_s:
            run.skip(f"train {name}", settings.min_train_s + tail)
            continue
        source = init_source_of(init_from, name)
        checkpoint = train_one(run, data, settings, name, batch, it_per_s, seconds, init_from=source)
        write_model_zip(run, name)
        if checkpoint is None or not run.fits(f"export {name}", settings.export_reserve_s / 2):
            continue
        model_dir = export_one(run, data, settings, name, checkpoint)
        if run.fits(f"evaluate {name}", settings.pack_reserve_s + 5):
            children[name] = start_evaluation(run, data, settings, name, model_dir)
    for name, child in children.items():
        finish_evaluation(run, settings, name, child)


if __name__ == "__main__":
    sys.exit(main(started=_PROCESS_START))
