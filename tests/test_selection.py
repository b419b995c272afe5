"""Tests of companion.training.selection: validation scores while training, and the best checkpoint kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from companion.data.synthetic import make_dataset
from companion.model.unet import UNetOutput
from companion.training.config import TrainConfig
from companion.training.selection import SnapshotSelection, read_selection, validation_score
from companion.training.train import train


class Oracle(nn.Module):
    """Outputs made from the ground truth: worm k embedded at 10 * e_k, the right class logits,
    and the background logit raised by ``bias`` on every pixel."""

    def __init__(self, samples, bias: float = 0.0) -> None:
        super().__init__()
        self.outputs = {}
        for s in samples:
            masks = torch.as_tensor(np.asarray(s.instances, np.float32))
            count = masks.sum(0)
            embedding = torch.zeros(16, *count.shape)
            embedding[: len(masks)] = 10 * masks / count.clamp(min=1)
            logits = torch.stack(
                [4 - 8 * (count > 0).float() + bias, torch.zeros_like(count), 2 * (count > 1).float()]
            )
            self.outputs[float(torch.as_tensor(s.image).sum())] = (embedding, logits)

    def forward(self, x: torch.Tensor) -> UNetOutput:  # the image looked up by its sum
        embedding, logits = self.outputs[min(self.outputs, key=lambda k: abs(k - float(x.sum())))]
        return UNetOutput(embedding[None], logits[None])


def _samples(n: int = 2):
    return make_dataset(n, seed=5, shape=(64, 64))


def _oracle(samples, bias=0.0):
    return Oracle(samples, bias)


def test_an_oracle_scores_near_one_and_the_shift_recovers_a_biased_background():
    samples = _samples()
    exact = validation_score(_oracle(samples), samples, clustering="global")
    assert exact.avAP > 0.8 and exact.AP50 > 0.85 and exact.shift == 0.0  # 8 of 9 worms found
    assert exact.f1 == pytest.approx(1.0)
    # background logit 0.6 above the foreground on every worm pixel: all background unshifted
    biased = validation_score(_oracle(samples, bias=4.6), samples, clustering="global")
    assert biased.shift == 0.75 and biased.avAP == pytest.approx(exact.avAP)
    blind = validation_score(_oracle(samples, bias=4.6), samples, shifts=[0.0])
    assert blind.avAP == 0.0 and blind.f1 < 0.2  # only the overlap pixels stay foreground
    with pytest.raises(ValueError, match="at least one"):
        validation_score(_oracle(samples), [])


def test_the_best_checkpoint_is_kept_and_a_resumed_run_forgets_later_scores(tmp_path):
    samples = _samples()
    now = [0.0]
    selection = SnapshotSelection(samples, tmp_path, every_s=10, clock=lambda: now[0])
    good, bad = _oracle(samples), _oracle(samples, bias=9.0)  # bad: no worm at any shift
    checkpoint = tmp_path / "last.pt"
    for iteration, model in ((0, bad), (5, good), (9, bad)):
        checkpoint.write_text(f"weights of {iteration}")
        selection.score(model, iteration, checkpoint)
    assert (tmp_path / "best.pt").read_text() == "weights of 5"
    records = read_selection(tmp_path)
    assert [r["iteration"] for r in records] == [0, 5, 9] and [r["best"] for r in records] == [
        True,
        True,
        False,
    ]
    assert not selection.due()
    now[0] = 10.0
    assert selection.due()
    again = SnapshotSelection(samples, tmp_path, every_s=10)
    again.resume_at(4)
    assert [r["iteration"] for r in read_selection(tmp_path)] == [0]
    assert again.best == records[0]["avAP"]
    with pytest.raises(ValueError, match="every_s"):
        SnapshotSelection(samples, tmp_path, every_s=0)


def test_training_scores_its_start_its_end_and_keeps_the_best(tmp_path):
    data, val = make_dataset(2, seed=0, shape=(96, 96)), make_dataset(1, seed=9, shape=(64, 64))
    base = TrainConfig.preset("quick", iterations=4, checkpoint_every=2, log_every=2)
    first = train(base, data, tmp_path / "a", progress=False)
    config = TrainConfig.from_dict({**base.to_dict(), "init_from": str(first), "select_every": 3600.0})
    train(config, data, tmp_path / "b", progress=False, validation=val)
    records = read_selection(tmp_path / "b")
    assert [r["iteration"] for r in records] == [0, 4]  # the starting weights, then the end
    assert (tmp_path / "b" / "best.pt").is_file() and records[0]["best"]
    kept = torch.load(tmp_path / "b" / "best.pt", weights_only=True)["iteration"]
    assert kept == max(records, key=lambda r: (r["avAP"], -r["iteration"]))["iteration"]
    with pytest.raises(ValueError, match="validation wells"):
        train(config, data, tmp_path / "c", progress=False)
    assert json.loads((tmp_path / "b" / "selection.jsonl").read_text().splitlines()[0])["seconds"] >= 0
