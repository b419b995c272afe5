"""Peak memory of the training objective: the batched objective vs the looped one it replaced.

One forward + backward of :func:`companion.training.losses.training_objective` (the ``cpu`` preset's
Concrete Dropout network for the regulariser) on a batch of 32 crops of 512 x 512 with
``K = 15`` instance masks each (overlapping bands, ~4 % of a crop each), from fixed random
network outputs. Each objective runs in a fresh process; the figure is the growth of the
process's peak resident memory during the objective (the gradients of the embedding and the
logits included, 0.6 GB of it). The last line is
``peak memory of the objective, batch 32, 512 x 512, K 15: <looped> MB looped, <batched> MB batched``.

Run: ``python benchmarks/bench_objective_memory.py``
"""

from __future__ import annotations

import gc
import resource
import subprocess
import sys
from pathlib import Path

import torch

BATCH, MASKS, SIZE = 32, 15, 512


def measure(kind: str) -> float:
    """MB by which the objective raises the peak resident memory of this process."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_training import objective_of

    from companion.model.unet import UNetOutput
    from companion.training.config import TrainConfig
    from companion.training.losses import training_objective
    from companion.training.step import build_model

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    model = build_model(TrainConfig.preset("cpu"))
    masks = torch.zeros(BATCH, MASKS, SIZE, SIZE, dtype=torch.bool)
    top = torch.randint(0, SIZE - 40, (BATCH, MASKS), generator=generator)
    for b in range(BATCH):
        for k in range(MASKS):
            masks[b, k, top[b, k] : top[b, k] + 20] = True
    batch = {
        "target": torch.randint(0, 3, (BATCH, SIZE, SIZE), generator=generator),
        "instances": masks,
        "valid": torch.ones(BATCH, MASKS, dtype=torch.bool),
    }
    embedding = torch.randn(BATCH, 16, SIZE, SIZE, generator=generator).requires_grad_()
    logits = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator).requires_grad_()
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with objective_of(kind):
        training_objective(model, UNetOutput(embedding, logits), batch, n_train=40).total.backward()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # KB -> MB


def main() -> None:
    if len(sys.argv) == 2:  # the child process
        print(f"{measure(sys.argv[1]):.0f}")
        return
    peaks = {
        kind: float(
            subprocess.run(
                [sys.executable, __file__, kind], capture_output=True, text=True, check=True
            ).stdout
        )
        for kind in ("looped", "batched")
    }
    print(
        f"peak memory of the objective, batch {BATCH}, {SIZE} x {SIZE}, K {MASKS}: "
        f"{peaks['looped']:.0f} MB looped, {peaks['batched']:.0f} MB batched"
    )


if __name__ == "__main__":
    main()
