"""Tests of companion.evaluation.metrics: pycocotools agreement and hand-worked examples."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from companion.evaluation import metrics
from companion.evaluation.metrics import instance_metrics, iou_matrix, matched_pairs, overlaps


def _box(shape, rows, cols):
    m = np.zeros(shape, bool)
    m[rows, cols] = True
    return m


def _random_stack(rng, n, shape):
    """Random overlapping rectangles and discs (none empty)."""
    masks = np.zeros((n,) + shape, bool)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for k in range(n):
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        if rng.random() < 0.5:
            h, w = rng.integers(2, shape[0] // 2), rng.integers(2, shape[1] // 2)
            masks[k, max(cy - h, 0) : cy + h, max(cx - w, 0) : cx + w] = True
        else:
            r = rng.integers(2, shape[0] // 3)
            masks[k] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        masks[k, cy, cx] = True
    return masks


def _jitter(rng, gt, shape, n_extra):
    """Predictions: shifted copies of some gt masks plus random extra masks."""
    preds = [np.roll(m, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1)) for m in gt if rng.random() < 0.8]
    preds += list(_random_stack(rng, n_extra, shape))
    preds = [p for p in preds if p.any()]
    return np.array(preds, bool).reshape((-1,) + shape)


def _pycocotools_stats(gts, preds, scores):
    pytest.importorskip("pycocotools")
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def rle(m):
        r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        return r

    h, w = gts[0].shape[1:]
    images, anns, results = [], [], []
    for i, (gt, pred, score) in enumerate(zip(gts, preds, scores), start=1):
        images.append(dict(id=i, height=h, width=w))
        for m in gt:
            anns.append(
                dict(
                    id=len(anns) + 1,
                    image_id=i,
                    category_id=1,
                    iscrowd=0,
                    segmentation=rle(m),
                    area=float(m.sum()),
                    bbox=[0, 0, w, h],
                )
            )
        for m, s in zip(pred, score):
            results.append(dict(image_id=i, category_id=1, segmentation=rle(m), score=float(s)))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dict(images=images, annotations=anns, categories=[dict(id=1, name="worm")])
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_coco_ap_matches_pycocotools(seed):
    rng = np.random.default_rng(seed)
    shape = (24, 32)
    gts, preds, scores = [], [], []
    for i in range(6):
        n_gt = 0 if i == 1 else int(rng.integers(1, 8))
        gt = _random_stack(rng, n_gt, shape)
        if i == 2 and n_gt:
            gt = np.concatenate([gt, gt[:1]])  # duplicate gt: equal IoUs, COCOeval's tie rule
        pred = np.zeros((0,) + shape, bool) if i == 3 else _jitter(rng, gt, shape, int(rng.integers(0, 4)))
        if i == 4:
            gt, pred = gt[:0], pred[:0]  # neither gt nor predictions
        # scores rounded to one decimal: many ties, so the stable sort order matters
        score = np.round(rng.random(len(pred)), 1)
        gts.append(gt), preds.append(pred), scores.append(score)
    ours = instance_metrics(gts, preds, scores)
    stats = _pycocotools_stats(gts, preds, scores)
    assert ours["avAP"] == pytest.approx(stats[0], abs=1e-6)
    assert ours["AP50"] == pytest.approx(stats[1], abs=1e-6)
    assert ours["AP75"] == pytest.approx(stats[2], abs=1e-6)


def test_coco_ap_matches_pycocotools_beyond_100_detections():
    rng = np.random.default_rng(7)
    shape = (16, 16)
    gt = _random_stack(rng, 30, shape)
    pred = np.concatenate([_jitter(rng, gt, shape, 0), _random_stack(rng, 100, shape)])
    score = rng.random(len(pred))
    assert len(pred) > metrics.MAX_DETECTIONS
    ours = instance_metrics([gt], [pred], [score])
    stats = _pycocotools_stats([gt], [pred], [score])
    assert ours["avAP"] == pytest.approx(stats[0], abs=1e-6)
    assert ours["AP50"] == pytest.approx(stats[1], abs=1e-6)


def test_no_gt_at_all_gives_minus_one_like_cocoeval():
    pred = _box((8, 8), slice(0, 4), slice(0, 4))[None]
    result = instance_metrics([np.zeros((0, 8, 8), bool)], [pred], [np.array([0.5])])
    assert result["avAP"] == -1 and result["AP50"] == -1
    assert result["avAP_dsb"] == 0.0  # one FP, no TP: 0 / (0 + 1 + 0)


def test_iou_matrix_equals_naive_loop_dense_and_sparse():
    rng = np.random.default_rng(3)
    a, b = _random_stack(rng, 5, (20, 30)), _random_stack(rng, 4, (20, 30))
    naive = np.array([[(x & y).sum() / (x | y).sum() for y in b] for x in a])
    np.testing.assert_allclose(iou_matrix(a, b), naive, rtol=0, atol=1e-12)
    for dense in (True, False):
        ov = overlaps(a, b, dense=dense)
        np.testing.assert_array_equal(ov.intersection, [[(x & y).sum() for y in b] for x in a])
        np.testing.assert_array_equal(ov.area_a, a.sum(axis=(1, 2)))
        np.testing.assert_array_equal(ov.area_b, b.sum(axis=(1, 2)))
        assert overlaps(a[:0], b, dense=dense).intersection.shape == (0, 4)
    assert iou_matrix(a, b[:0]).shape == (5, 0)


def test_overlaps_and_iou_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"\(K, H, W\)"):
        overlaps(np.zeros((4, 4), bool), np.zeros((1, 4, 4), bool))
    with pytest.raises(ValueError, match="image size"):
        iou_matrix(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 5), bool))
    with pytest.raises(ValueError, match="scores"):
        instance_metrics([np.zeros((1, 4, 4), bool)], [np.zeros((2, 4, 4), bool)], [np.ones(1)])


def test_matched_pairs_prefers_more_pairs_above_threshold():
    # plain max-IoU assignment would pair (0,0) [0.9] and leave row 1 with 0.0;
    # counting pairs >= 0.5 first pairs (0,1) and (1,0)
    scores = np.array([[0.9, 0.6], [0.7, 0.0]])
    rows, cols = matched_pairs(scores, 0.5)
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 1), (1, 0)]
    assert len(matched_pairs(scores, 0.95)[0]) == 0


def test_perfect_prediction_scores_one_everywhere():
    rng = np.random.default_rng(0)
    gts = [_random_stack(rng, 5, (20, 20)) for _ in range(3)]
    result = instance_metrics(gts, [g.copy() for g in gts], [rng.random(len(g)) for g in gts])
    for key in ("avAP", "AP50", "AP75", "recall80", "avAP_dsb"):
        assert result[key] == pytest.approx(1.0, abs=1e-12), key
    assert all(p["n_gt"] == p["n_pred"] == 5 for p in result["per_image"])


def test_false_split_hand_worked():
    shape = (8, 8)
    gt = _box(shape, slice(0, 4), slice(0, 8))[None]  # 32 px
    big = _box(shape, slice(0, 4), slice(0, 5))  # 20 px: IoU 20/32 = 0.625, Dice 40/52 = 0.77
    small = _box(shape, slice(0, 4), slice(5, 8))  # 12 px: IoU 0.375
    pred = np.stack([big, small])
    r = instance_metrics([gt], [pred], [np.array([0.9, 0.8])])
    # t = 0.50, 0.55, 0.60: the big part (ranked first) is a TP, precision 1 at recall 1 -> AP 1
    # t >= 0.65: no TP -> AP 0. So avAP = 3/10, AP50 = 1, AP75 = 0.
    assert r["AP50"] == pytest.approx(1.0) and r["AP75"] == 0.0
    assert r["avAP"] == pytest.approx(0.3)
    assert r["recall80"] == 0.0  # Dice 0.77 < 0.8
    # DSB: TP 1, FP 1, FN 0 -> 1/2 at three thresholds, 0/(0+2+1) = 0 at seven -> 0.15
    assert r["avAP_dsb"] == pytest.approx(0.15)
    # ranked the other way, the first detection is an FP: precision [0, 1/2] -> monotone 1/2
    r2 = instance_metrics([gt], [pred], [np.array([0.8, 0.9])])
    assert r2["AP50"] == pytest.approx(0.5)


def test_false_merge_hand_worked():
    shape = (6, 12)
    a = _box(shape, slice(0, 4), slice(0, 4))  # 16 px
    b = _box(shape, slice(0, 4), slice(4, 9))  # 20 px
    merged = (a | b)[None]  # 36 px: IoU 16/36 = 0.44 with a, 20/36 = 0.56 with b
    r = instance_metrics([np.stack([a, b])], [merged], [np.array([0.9])])
    # t = 0.50, 0.55: one TP (b), recall 1/2 at precision 1 -> recall points 0..0.50 = 51 of 101
    ap_low = 51 / 101
    assert r["AP50"] == pytest.approx(ap_low)
    assert r["avAP"] == pytest.approx(2 * ap_low / 10)
    assert r["AP75"] == 0.0
    assert r["recall80"] == 0.0  # Dice with b = 40/56 = 0.71
    # DSB: TP 1, FP 0, FN 1 -> 1/2 at t = 0.50, 0.55; 0/(0+1+2) = 0 above -> 0.1
    assert r["avAP_dsb"] == pytest.approx(0.1)


def test_overlapping_worms_hand_worked():
    shape = (12, 10)
    horizontal = _box(shape, slice(4, 6), slice(0, 10))  # 20 px
    vertical = _box(shape, slice(0, 12), slice(4, 6))  # 24 px, 4 px shared with horizontal
    gt = np.stack([horizontal, vertical])
    # exact overlapping prediction: perfect
    exact = instance_metrics([gt], [gt.copy()], [np.array([0.9, 0.8])])
    assert exact["avAP"] == pytest.approx(1.0) and exact["avAP_dsb"] == 1.0
    # the vertical worm predicted without the crossing: IoU 20/24 = 0.83, Dice 40/44 = 0.91
    pred = np.stack([horizontal, vertical & ~horizontal])
    r = instance_metrics([gt], [pred], [np.array([0.9, 0.8])])
    # t <= 0.80 (7 thresholds): both TP -> AP 1; t >= 0.85: only the first -> 51/101
    assert r["avAP"] == pytest.approx((7 + 3 * 51 / 101) / 10)
    assert r["AP50"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(1.0)
    assert r["recall80"] == 1.0
    # DSB: 1 at seven thresholds, TP 1 FP 1 FN 1 -> 1/3 at three -> (7 + 1) / 10
    assert r["avAP_dsb"] == pytest.approx(0.8)
    assert r["per_image"][0]["n_recalled80"] == 2


def test_per_image_entries_and_empty_image():
    gt = _box((8, 8), slice(0, 4), slice(0, 4))[None]
    empty = np.zeros((0, 8, 8), bool)
    r = instance_metrics([gt, empty], [gt, empty], [np.ones(1), np.ones(0)])
    assert [p["n_gt"] for p in r["per_image"]] == [1, 0]
    assert r["per_image"][1]["avAP_dsb"] == 1.0  # nothing to find, nothing found
    assert r["per_image"][1]["AP50"] == -1.0
    assert r["avAP_dsb"] == 1.0


def test_precision_recall_curve_hand_worked():
    # predictions in score order: FP (0.9), TP (0.8); one gt worm
    iou = np.array([[0.1], [0.7]])
    curve = metrics.precision_recall_curve([iou], [np.array([0.9, 0.8])])
    np.testing.assert_array_equal(curve.scores, [0.9, 0.8])
    np.testing.assert_allclose(curve.recall[0], [0.0, 1.0])
    np.testing.assert_allclose(curve.precision[0], [0.0, 0.5])
    np.testing.assert_allclose(curve.interpolated[0], 0.5)  # monotone: 0.5 at every recall point
    assert curve.n_gt == 1
    np.testing.assert_allclose(
        metrics.coco_ap([iou], [np.array([0.9, 0.8])]), curve.interpolated.mean(axis=1)
    )


@pytest.mark.realdata
def test_real_wells_against_pycocotools(bbbc010_root):
    from companion.data.bbbc010 import load_bbbc010
    from companion.data.simulate import perturb_instances

    samples = load_bbbc010(bbbc010_root, wells=["C03", "C04"], progress=False)
    rng = np.random.default_rng(0)
    gts = [s.instances for s in samples]
    perfect = instance_metrics(gts, gts, [np.ones(len(g)) for g in gts])
    assert perfect["avAP_dsb"] == 1.0 and perfect["recall80"] == 1.0
    preds = [perturb_instances(g, rng, max_radius=1) for g in gts]
    scores = [rng.random(len(p)) for p in preds]
    ours = instance_metrics(gts, preds, scores)
    stats = _pycocotools_stats(gts, preds, scores)
    assert ours["avAP"] == pytest.approx(stats[0], abs=1e-6)
    assert ours["AP50"] == pytest.approx(stats[1], abs=1e-6)
    assert ours["AP75"] == pytest.approx(stats[2], abs=1e-6)


def test_probability_maps_are_refused_not_cast_to_true():
    gt = np.zeros((1, 4, 4), bool)
    gt[0, :2] = True
    probs = np.full((1, 4, 4), 0.3)
    with pytest.raises(ValueError, match="binary masks.*0.3.*binarize"):
        iou_matrix(probs, gt)
    assert iou_matrix(gt.astype(np.uint8), gt)[0, 0] == 1.0  # 0/1 integers are masks
