"""Tests of companion.evaluation.prediction_files and companion.evaluation.scoring: other tools' predictions, scored by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from companion.cli import main
from companion.data.bbbc010 import TEST_WELLS
from companion.evaluation.prediction_files import (
    masks_from_labels,
    read_prediction,
    read_predictions,
    well_of,
)
from companion.evaluation.scoring import INCOMPLETE_TEST_WELLS, score_predictions, write_scores


def test_label_layers_label_images_and_mask_stacks():
    layers = np.zeros((3, 1, 4, 5), np.uint16)
    layers[0, 0, 0] = 4  # worm 4: row 0 of layer 0 and row 3 of layer 2
    layers[1, 0, :2, 0] = 2  # worm 2 overlaps worm 4 at (0, 0)
    layers[2, 0, 3] = 4
    masks = masks_from_labels(layers)
    assert masks.shape == (2, 4, 5) and masks.sum(axis=(1, 2)).tolist() == [2, 10]  # ids 2, 4
    assert masks[0, 0, 0] and masks[1, 0, 0]  # the overlap pixel is in both
    stack = np.zeros((3, 4, 5), np.uint8)
    stack[0, 0] = 1
    stack[2, :, 0] = 1  # 0/1 layers: one worm a layer, empty layers dropped
    assert masks_from_labels(stack).sum(axis=(1, 2)).tolist() == [5, 4]
    assert masks_from_labels(np.array([[0, 3], [3, 1]])).sum(axis=(1, 2)).tolist() == [1, 2]
    with pytest.raises(ValueError, match="label image"):
        masks_from_labels(np.zeros((2, 2, 3, 4, 5), np.uint8))
    assert [well_of(n) for n in ("C03.hdf", "x/pred_E04-w1.tif")] == ["C03", "E04"]
    with pytest.raises(ValueError, match="cannot tell the well"):
        well_of("A01_C03.tif")


def test_files_of_each_kind(tmp_path):
    import tifffile

    h5py = pytest.importorskip("h5py")
    layers = np.zeros((2, 1, 4, 5), np.uint16)
    layers[0, 0, 0] = 1
    layers[1, 0, 1] = 2
    with h5py.File(tmp_path / "C03.hdf", "w") as handle:
        handle["vote_instances"] = layers
    tifffile.imwrite(tmp_path / "pred_C04.tif", layers[:, 0])
    masks = np.zeros((2, 4, 5), bool)
    masks[1, 2] = True
    np.savez(tmp_path / "D01.npz", masks=masks, scores=np.array([0.2, 0.9]))
    read = {p.well: p for p in read_predictions(tmp_path)}
    assert sorted(read) == ["C03", "C04", "D01"]
    assert np.array_equal(read["C03"].masks, read["C04"].masks) and read["C03"].scores is None
    assert read["D01"].scores.tolist() == [0.2, 0.9] and read["D01"].masks.shape == (2, 4, 5)
    with pytest.raises(ValueError, match="no dataset nope"):
        read_prediction(tmp_path / "C03.hdf", dataset="nope")
    np.savez(tmp_path / "again_C03.npz", masks=masks)
    with pytest.raises(ValueError, match="several prediction files for well"):
        read_predictions(tmp_path)


def _truths(shape=(4, 6)) -> dict:
    """Every test well empty but C03: two worms, the top two rows and the bottom two."""
    truths = {w: np.zeros((0, *shape), bool) for w in TEST_WELLS}
    gt = np.zeros((2, *shape), bool)
    gt[0, :2] = True
    gt[1, 2:] = True
    truths["C03"] = gt
    return truths


def test_every_protocol_value_by_hand(tmp_path):
    from companion.evaluation.prediction_files import Prediction

    truths = _truths()
    pred = np.zeros((3, 4, 6), bool)
    pred[0, :2] = True  # worm 0 exactly: IoU 1
    pred[1, 2:, :5] = True  # worm 1 less a column: IoU 10 / 12 = 0.83 (Dice 0.91)
    pred[2, 0, 0] = True  # a false positive inside worm 0: IoU 1 / 12
    result = score_predictions([Prediction("C03", pred, None, None)], truths)
    complete, every = result.rows
    assert (complete["wells"], every["wells"]) == (47, 50)
    assert complete["recall80"] == 1.0 and complete["recall80_iou"] == 1.0
    # C03 at IoU 0.5-0.8: 2 TP, 1 FP -> S = 2 / 3; at 0.9: 1 TP -> 1 / 4; the 46 empty wells score 1
    s_c03 = {50: 2 / 3, 60: 2 / 3, 70: 2 / 3, 80: 2 / 3, 90: 1 / 4}
    for t, value in s_c03.items():
        assert complete[f"S{t}"] == pytest.approx((46 + value) / 47)
        assert every[f"S{t}"] == pytest.approx((49 + value) / 50)
    assert complete["avS"] == pytest.approx(np.mean([(46 + v) / 47 for v in s_c03.values()]))
    # COCO, unit scores in file order: TP, TP, FP -> precision 1 up to recall 1 at 0.5 ... 0.8
    assert complete["AP50"] == pytest.approx(1.0) and complete["AP75"] == pytest.approx(1.0)
    # at 0.85, 0.9, 0.95 only worm 0 is found: precision 1 at the 51 recall points 0 ... 0.5
    assert complete["avAP"] == pytest.approx((7 + 3 * 51 / 101) / 10)
    assert sorted(result.missing) == sorted(w for w in TEST_WELLS if w != "C03")
    files = write_scores(result, tmp_path / "out", info=dict(note="hand-made"))
    assert [f.name for f in files] == ["results.json", "table1.csv", "per_image.csv"]
    document = json.loads(files[0].read_text())
    assert document["note"] == "hand-made" and len(document["rows"]) == 2
    assert len((tmp_path / "out" / "per_image.csv").read_text().splitlines()) == 1 + 47 + 50


def test_a_loose_worm_passes_dice_but_not_iou_at_0_8():
    from companion.evaluation.prediction_files import Prediction

    truths = _truths(shape=(4, 10))
    pred = np.zeros((2, 4, 10), bool)
    pred[0, :2] = True
    pred[1, 2:, :7] = True  # IoU 14 / 20 = 0.7, Dice 0.82
    row = score_predictions([Prediction("C03", pred, None, None)], truths, protocols=("complete",)).rows[0]
    assert row["recall80"] == 1.0 and row["recall80_iou"] == 0.5
    with pytest.raises(ValueError, match="outside the test split"):
        score_predictions([Prediction("A01", pred, None, None)], truths)
    with pytest.raises(KeyError, match="C13"):
        score_predictions([], {w: m for w, m in truths.items() if w not in INCOMPLETE_TEST_WELLS})


@pytest.mark.realdata
def test_the_score_command_on_a_real_well(bbbc010_root, tmp_path, capsys):
    import tifffile

    from companion.data.bbbc010 import find_layout, load_masks

    masks = load_masks(find_layout(bbbc010_root), "C13")  # an incomplete well: its masks are whole
    labels = np.zeros((len(masks), *masks.shape[1:]), np.uint16)
    for i, mask in enumerate(masks):
        labels[i][mask] = i + 1
    tifffile.imwrite(tmp_path / "C13.tif", labels)
    out = tmp_path / "scored"
    assert (
        main(["score", str(tmp_path / "C13.tif"), "--out", str(out), "--data-root", str(bbbc010_root)]) == 0
    )
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["all"]["recall80_iou"] == pytest.approx(
        len(masks) / sum(len(load_masks(find_layout(bbbc010_root), w)) for w in TEST_WELLS)
    )
    assert rows["complete"]["recall80_iou"] == 0.0  # C13 is not among the complete wells
    assert "no prediction for 49 test well(s)" in capsys.readouterr().err


def _floats(value) -> list[float]:
    if isinstance(value, dict):
        return [f for v in value.values() for f in _floats(v)]
    if isinstance(value, list):
        return [f for v in value for f in _floats(v)]
    return [value] if isinstance(value, float) else []


def test_every_number_of_the_protocol_note_is_computed():
    import re
    from pathlib import Path

    from companion.evaluation.paper import PATCHPERPIX, PATCHPERPIX_S, TABLE1

    root = Path(__file__).resolve().parents[1] / "results"
    computed = _floats(json.loads((root / "protocol" / "patchperpix.json").read_text()))
    for folder in root.glob("*/results.json"):
        computed += [
            r[k] for r in json.loads(folder.read_text())["rows"] for k in ("recall80_iou", "avAP") if k in r
        ]
    published = [
        *PATCHPERPIX.values(),
        *PATCHPERPIX_S.values(),
        *(v for row in TABLE1.values() for v in row.values()),
    ]
    values = {round(v, 3) for v in computed + published}
    allowed = values | {round(abs(a - b), 3) for a in values for b in values}
    quoted = [float(n) for n in re.findall(r"(?<![\d.])0\.\d{3}(?!\d)", (root / "PROTOCOL.md").read_text())]
    assert len(quoted) > 40
    assert [n for n in quoted if n not in allowed] == []
