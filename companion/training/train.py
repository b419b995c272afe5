"""Training: the loop that trains the U-Net, resumable, on one device or several.

The U-Net (:mod:`companion.model.unet`) learns the objective of :mod:`.losses` on the augmented
crops of :func:`.batches.make_loader`, as a :class:`.config.TrainConfig` says, and writes
checkpoints (:mod:`.checkpoint`) and a log into a locked run folder (:mod:`.run_folder`).

Design decisions
----------------
* **Data order is a function of (seed, iteration)** (:mod:`.batches`), and a checkpoint holds
  every random state (:mod:`.checkpoint`): a CPU run that is killed and resumed ends with
  weights bit-identical to an uninterrupted one.
* **Nothing waits for the device between logs**: the objective takes the whole batch at once
  (:mod:`.losses`), and the loss is read on the host only when it is logged or a
  checkpoint is written; the first non-finite loss is still named exactly, and never reaches a
  checkpoint.
* **A run can be sized to a wall-clock budget** (``TrainConfig.time_budget``,
  :mod:`.budget`): its schedule ends, and its last checkpoint is written, in time.
* **Mixed precision on CUDA only**: bf16 autocast where the GPU supports it natively
  (Ampere and newer), fp16 autocast with a :class:`torch.amp.GradScaler` otherwise (e.g. a
  Colab T4). The loss itself is computed in float32.
* **Multi-GPU**: the same entry point runs under ``torchrun --nproc_per_node N`` with
  :class:`~torch.nn.parallel.DistributedDataParallel` (NCCL on GPUs, gloo on the CPU, see
  :mod:`.distributed`). Every rank reads its own shard of each global batch and draws its own
  dropout masks; only rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from companion.model.dropout import dropout_rates

from .._io import atomic_write
from .batches import make_loader, single_threaded_numpy_blas, to_device
from .budget import TimeBudget
from .checkpoint import (
    check_resumable,
    init_source,
    init_weights,
    read_checkpoint,
    restore_rng,
    write_checkpoint,
)
from .config import TrainConfig, channel_statistics
from .distributed import DistInfo, init_distributed, unwrap
from .run_folder import TERM_NAMES, lock_run_folder, prepare_run_folder, trim_log
from .selection import SnapshotSelection
from .step import autocast_dtype, build_model, compiled_objective, make_optimizer, train_step, training_device

if TYPE_CHECKING:  # pragma: no cover
    from companion.data.bbbc010 import Sample

__all__ = ["train"]


def _rank_seed(seed: int, rank: int) -> int:
    """Seed of the dropout masks of one rank (rank 0 keeps ``seed``)."""
    return seed + 1_000_003 * rank


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def train(
    config: TrainConfig,
    data: Sequence[Sample],
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_checkpoint: Callable[[int, Path], None] | None = None,
    started: float | None = None,
    validation: Sequence[Sample] | None = None,
) -> Path:
    """Train a U-Net; returns the path of the final checkpoint ``out_dir/final.pt``.

    Parameters
    ----------
    config : TrainConfig
        The run (e.g. ``TrainConfig.preset("cpu")``).
    data : sequence of Sample
        Training images with their instance masks; ``n_train = len(data)`` scales the
        Concrete Dropout regulariser.
    out_dir : path
        Receives ``last.pt`` (every ``checkpoint_every`` iterations), ``final.pt`` and
        ``log.jsonl`` (one JSON record every ``log_every`` iterations: the mean of every loss
        term over those iterations, every layer's dropout rate, iterations/s).
    resume : bool
        Continue from ``out_dir/last.pt`` (starts afresh, with a warning, if there is none).
        Without it an ``out_dir`` that already holds a run's files (``last.pt``, ``final.pt``,
        ``log.jsonl``, ``iter_<N>.pt``) is refused with ``FileExistsError``.
    overwrite : bool
        Start afresh in an ``out_dir`` that holds an earlier run: its files are removed first
        (with a warning naming them). Not together with ``resume``.
    progress : bool
        Show a tqdm progress bar (loss and mean dropout rate).
    on_checkpoint : callable, optional
        Called as ``on_checkpoint(iteration, path)`` on rank 0 after each checkpoint (an
        exception it raises stops the run, which ``resume=True`` then continues).
    started : float, optional
        :func:`time.perf_counter` value from which ``config.time_budget`` counts (e.g. when a
        command started, before it loaded the data); default: this call.
    validation : sequence of Sample, optional
        Validation wells scored every ``config.select_every`` seconds, at the start and the end
        (:class:`companion.training.selection.SnapshotSelection`: the best checkpoint is kept as
        ``out_dir/best.pt``, the scores in ``selection.jsonl``); one process only.

    Notes
    -----
    Seeds the global Python, NumPy and torch random generators from ``config.seed``. Under
    ``torchrun`` (``WORLD_SIZE > 1``) it joins the process group, wraps the model in
    :class:`~torch.nn.parallel.DistributedDataParallel` and leaves the group at the end.

    The main process holds :func:`~companion.training.run_folder.lock_run_folder` on ``out_dir`` for the
    whole run: a second training into the same folder raises
    :class:`~companion.training.run_folder.RunFolderBusyError` naming the holder's pid.

    Examples
    --------
    >>> import tempfile
    >>> from companion.training.run_folder import read_log
    >>> from companion.data.synthetic import make_dataset
    >>> cfg = TrainConfig.preset("quick", iterations=4, checkpoint_every=2, log_every=2)
    >>> out = tempfile.mkdtemp()
    >>> final = train(cfg, make_dataset(2, seed=0, shape=(96, 96)), out, progress=False)
    >>> final.name, [r["iteration"] for r in read_log(out)]
    ('final.pt', [2, 4])
    """
    started = time.perf_counter() if started is None else started
    if len(data) == 0:
        raise ValueError("train() needs at least one training sample, got an empty sequence")
    if resume and overwrite:
        raise ValueError("pass resume=True (continue the run) or overwrite=True (replace it), not both")
    out_dir = Path(out_dir)
    if config.standardize and config.input_mean is None:
        saved = out_dir / "last.pt"
        if resume and saved.exists():  # the statistics the run started with
            stored = read_checkpoint(saved)["config"]
            mean, std = stored.get("input_mean"), stored.get("input_std")
        else:
            source = init_source(config.init_from)[1] if config.init_from else {}
            mean, std = source.get("input_mean"), source.get("input_std")
            if mean is None:
                mean, std = channel_statistics(data)
        config = TrainConfig.from_dict({**config.to_dict(), "input_mean": mean, "input_std": std})
    if bool(config.select_every) != (validation is not None):
        raise ValueError("give validation wells together with config.select_every > 0, or neither")
    device = training_device(config)
    dist_info = init_distributed(device.type)
    if validation is not None and dist_info.world_size > 1:
        raise ValueError("validation scores during training (select_every) need one process")
    selection = None
    if validation is not None:
        selection = SnapshotSelection(validation, out_dir, config.select_every, device=device)
    try:
        with lock_run_folder(out_dir) if dist_info.is_main else contextlib.nullcontext():
            if dist_info.is_main:
                prepare_run_folder(out_dir, resume, overwrite)
            return _train(
                config, data, out_dir, device, dist_info, resume, progress, on_checkpoint, started, selection
            )
    finally:
        if dist_info.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(
    config: TrainConfig,
    data: Sequence[Sample],
    out_dir: Path,
    device: torch.device,
    dist_info: DistInfo,
    resume: bool,
    progress: bool,
    on_checkpoint: Callable[[int, Path], None] | None,
    started: float,
    selection: SnapshotSelection | None,
) -> Path:
    from tqdm.auto import tqdm

    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    last_path, final_path, log_path = out_dir / "last.pt", out_dir / "final.pt", out_dir / "log.jsonl"

    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    torch.manual_seed(config.seed)  # same initial weights on every rank
    model = build_model(config).to(device)
    if config.init_from is not None and not (resume and last_path.exists()):
        init_weights(model, config.init_from)
    channels_last = config.channels_last  # NHWC convolutions: faster on GPUs and CPUs alike
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer = make_optimizer(model, config)
    amp_dtype = autocast_dtype(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    torch.manual_seed(_rank_seed(config.seed, dist_info.rank))

    start, sized = 0, False
    if resume and last_path.exists():
        # on the CPU: the random states must stay CPU tensors; load_state_dict moves the rest
        ckpt = read_checkpoint(last_path, map_location="cpu")
        check_resumable(ckpt, config, last_path)
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start = int(ckpt["iteration"])
        if config.time_budget and ckpt["config"].get("time_budget"):  # sized when it started
            config = TrainConfig.from_dict({**config.to_dict(), "iterations": ckpt["config"]["iterations"]})
            sized = True
        per_rank = ckpt.get("rng_per_rank", [ckpt["rng"]])
        if len(per_rank) == dist_info.world_size:
            restore_rng(per_rank[dist_info.rank])
        else:
            warnings.warn(
                f"{last_path} was written by {len(per_rank)} process(es), this run has "
                f"{dist_info.world_size}: random states are re-seeded",
                stacklevel=3,
            )
            torch.manual_seed(_rank_seed(config.seed, dist_info.rank) + start)
        if dist_info.is_main:
            trim_log(log_path, start)
            if start >= config.iterations:
                warnings.warn(
                    f"{last_path} is already at iteration {start} >= iterations="
                    f"{config.iterations}: nothing to train (raise --iterations to "
                    f"continue); final.pt is that checkpoint",
                    stacklevel=3,
                )
    elif resume and dist_info.is_main:
        dropped = (
            " (dropping the records of its log.jsonl, which no checkpoint kept)" if log_path.exists() else ""
        )
        trim_log(log_path, 0)  # the run repeats those iterations
        warnings.warn(
            f"resume requested but {last_path} does not exist: starting afresh{dropped}", stacklevel=3
        )

    if dist_info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    run = _RunState(
        config=config,
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        device=device,
        dist_info=dist_info,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        n_train=len(data),
        objective=compiled_objective(config),
        budget=TimeBudget(config.time_budget * 60, started=started, sizes=not sized)
        if config.time_budget
        else None,
        iteration_cap=config.iterations,
        start=start,
        last_path=last_path,
        log_path=log_path,
        on_checkpoint=on_checkpoint,
        selection=selection,
    )
    if selection is not None:
        selection.resume_at(start)
        if start == 0 and config.init_from:  # the starting weights are the first candidate
            write_checkpoint(model, optimizer, scaler, config, 0, dist_info, last_path, None)
            _score(run, 0)
    loader = make_loader(
        data,
        config,
        start=start,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        pin_memory=device.type == "cuda",
        device=device,
    )

    bar = tqdm(
        total=config.iterations,
        initial=start,
        disable=not (progress and dist_info.is_main),
        desc=f"training ({config.model}, {device.type})",
        dynamic_ncols=True,
    )
    with single_threaded_numpy_blas():
        _loop(run, loader, bar)
    bar.close()
    if dist_info.is_main:
        read_checkpoint(last_path)  # validates what we publish as final
        atomic_write(final_path, lambda tmp: shutil.copyfile(last_path, tmp))
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    return final_path


@dataclass
class _RunState:
    """What the iterations of one run share: set up by :func:`_train`, advanced by :func:`_loop`."""

    config: TrainConfig
    model: nn.Module  # the network, inside DistributedDataParallel when there are several ranks
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    dist_info: DistInfo
    amp_dtype: torch.dtype | None  # autocast dtype of the forward pass (None: float32)
    channels_last: bool  # batches moved to the device in channels-last memory format
    n_train: int  # training images (scales the Concrete Dropout regulariser)
    objective: Callable  # step_objective, compiled when config.compile is on
    budget: TimeBudget | None  # config.time_budget's clock (None: run config.iterations)
    iteration_cap: int  # config.iterations as given: a budgeted run sizes itself below it
    start: int  # iterations already done (by the checkpoint resumed from)
    last_path: Path
    log_path: Path
    on_checkpoint: Callable[[int, Path], None] | None
    selection: SnapshotSelection | None = None  # validation scores, best.pt (main process)

    @property
    def net(self) -> nn.Module:
        """The network itself (outside DistributedDataParallel)."""
        return unwrap(self.model)


def _loop(run: _RunState, loader: Iterable[dict], bar: Any) -> None:
    """The iterations ``run.start .. config.iterations - 1``: step, log, checkpoint.

    ``bar`` is the tqdm progress bar (advanced, and shown the loss, on every iteration).
    """
    config, model, optimizer, dist_info = run.config, run.model, run.optimizer, run.dist_info
    start, net, last_path = run.start, run.net, run.last_path
    window: list[torch.Tensor] = []
    window_start, window_time = start, time.perf_counter()
    unchecked: list[torch.Tensor] = []  # losses of the iterations since the last finiteness check
    iteration = start
    for batch in loader:
        batch = to_device(batch, run.device, run.channels_last)
        if config.lr_schedule != "constant":
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(iteration) * group.get("lr_scale", 1.0)
        terms = train_step(
            model,
            optimizer,
            batch,
            n_train=run.n_train,
            config=config,
            scaler=run.scaler,
            amp_dtype=run.amp_dtype,
            disc_weight=0.0 if iteration < config.disc_warmup else 1.0,
            objective=run.objective,
        )
        window.append(torch.stack([t.float() for t in terms]))
        unchecked.append(terms.total)  # read on the host only when logging or checkpointing
        iteration += 1
        bar.update(1)
        stop = False
        if run.budget is not None:
            config, stop = _follow_budget(run, iteration, terms.total, bar)
        last = iteration >= config.iterations or stop
        logs = iteration % config.log_every == 0 or last
        scores = run.selection is not None and (last or run.selection.due())
        checkpoints = iteration % config.checkpoint_every == 0 or last or scores
        if logs or checkpoints:  # stop before a poisoned step reaches the log or a checkpoint
            _check_finite_losses(unchecked, iteration - len(unchecked), optimizer, last_path)
            unchecked = []
        if logs:
            _append_log(run, window, iteration, window_start, window_time, bar)
            window, window_start, window_time = [], iteration, time.perf_counter()
        if checkpoints:
            if not all(torch.isfinite(p).all() for p in net.parameters()):
                _stop_non_finite(
                    f"the weights after iteration {iteration} are not finite", optimizer, last_path
                )
            write_checkpoint(
                model, optimizer, run.scaler, config, iteration, dist_info, last_path, run.on_checkpoint
            )
            if dist_info.is_main and config.snapshot_every and iteration % config.snapshot_every == 0:
                snapshot = last_path.with_name(f"iter_{iteration:07d}.pt")
                atomic_write(snapshot, lambda tmp: shutil.copyfile(last_path, tmp))
        if scores:
            _score(run, iteration)
        if last:  # the loader of a budgeted run holds more batches than the budget allows
            break


def _score(run: _RunState, iteration: int) -> None:
    """Score the weights of ``last.pt`` on the validation wells; a budget keeps time for one more."""
    result = run.selection.score(run.net, iteration, run.last_path)
    if run.budget is not None:  # expired() stops half a reserve early: room for the last score
        run.budget.reserve_s = max(run.budget.reserve_s, 2 * result.seconds)


def _follow_budget(run: _RunState, iteration: int, loss: torch.Tensor, bar: Any) -> tuple[TrainConfig, bool]:
    """Size the run once its rate is known; whether it must stop now to end within the budget.

    Under ``torchrun`` rank 0 decides both (a broadcast each step).
    """
    budget, done = run.budget, iteration - run.start
    if budget.probing(done):
        float(loss)  # waits for the device: the host clock measures the device's rate
    more = budget.sized_iterations(done)
    stop = budget.expired()
    if run.dist_info.world_size > 1:
        import torch.distributed as dist

        decision = [more, stop]
        dist.broadcast_object_list(decision, src=0)
        more, stop = decision
    if more is not None:
        sized = min(run.iteration_cap, iteration + more)
        run.config = TrainConfig.from_dict({**run.config.to_dict(), "iterations": sized})
        bar.total = sized
        bar.refresh()
        if run.dist_info.is_main:
            bar.write(
                f"time budget {run.config.time_budget:g} min: {budget.seconds_per_step:.3g} s per "
                f"iteration, the schedule ends at iteration {sized}"
            )
    return run.config, stop


def _check_finite_losses(
    losses: list[torch.Tensor], first: int, optimizer: torch.optim.Optimizer, last_path: Path
) -> None:
    """Raise, naming the first non-finite one, if any of the losses of iterations ``first + 1 ..``
    is NaN or infinite (one host synchronisation for all of them)."""
    if not losses:
        return
    values = torch.stack([loss.float() for loss in losses])
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    index = int((~finite).int().argmax())
    _stop_non_finite(
        f"the loss of iteration {first + index + 1} is {float(values[index])}", optimizer, last_path
    )


def _stop_non_finite(what: str, optimizer: torch.optim.Optimizer, last_path: Path) -> None:
    kept = (
        f"{last_path} keeps the last finite checkpoint"
        if last_path.exists()
        else "no checkpoint was written yet"
    )
    raise FloatingPointError(
        f"training stopped: {what} (lr {optimizer.param_groups[0]['lr']:g}); {kept}. Lower "
        f"--lr, keep --grad-clip on, or check the training images for NaN values"
    )


def _append_log(
    run: _RunState,
    window: list[torch.Tensor],
    iteration: int,
    window_start: int,
    window_time: float,
    bar: Any,
) -> None:
    """Append the record of iterations ``window_start + 1 .. iteration`` to the log (main process)."""
    means = torch.stack(window).mean(dim=0)
    if run.dist_info.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(means)
        means /= run.dist_info.world_size
    if not run.dist_info.is_main:
        return
    seconds = time.perf_counter() - window_time
    record: dict[str, Any] = {"iteration": iteration}
    record.update({name: float(v) for name, v in zip(TERM_NAMES, means.tolist())})
    record["dropout_rates"] = rates = [float(p) for p in dropout_rates(run.net)]
    record["it_per_s"] = (iteration - window_start) / seconds if seconds > 0 else math.nan
    record["lr"] = float(run.optimizer.param_groups[0]["lr"])
    record["time"] = time.time()
    with open(run.log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    bar.set_postfix(loss=f"{record['total']:.4g}", p=f"{np.mean(rates):.3f}" if rates else "-")
