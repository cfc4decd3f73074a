"""PQ against panopticapi's own code (panopticapi-lite) on hand-built, random and real cases."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.coco.panoptic_io import encode_panoptic_png, read_panoptic_png, segment_stats
from pipeline.evaluate import (
    PQStat,
    format_pq_table,
    pq_compute,
    pq_image_stat,
    pq_results,
)

panopticapi_eval = pytest.importorskip("panopticapi.evaluation")

# things 1, 2, 3 (3 never in the ground truth), stuff 10, 11, 12 (12 never anywhere)
CATEGORIES = [
    {"id": 1, "name": "a", "isthing": 1},
    {"id": 2, "name": "b", "isthing": 1},
    {"id": 3, "name": "c", "isthing": 1},
    {"id": 10, "name": "s", "isthing": 0},
    {"id": 11, "name": "t", "isthing": 0},
    {"id": 12, "name": "u", "isthing": 0},
]


def write_panoptic(folder: Path, name: str, images: list[dict], categories=CATEGORIES) -> str:
    """Write ``folder/name.json`` and ``folder/name/<image>.png``; returns the JSON path.

    images: [{"image_id", "ids": (H, W) id map, "cats": {id: category}, "crowd": {ids}}].
    """
    (folder / name).mkdir(parents=True, exist_ok=True)
    annotations = []
    for img in images:
        file_name = f"{img['image_id']}.png"
        (folder / name / file_name).write_bytes(encode_panoptic_png(img["ids"]))
        segments = [
            {"id": i, "category_id": img["cats"][i], "iscrowd": int(i in img.get("crowd", ())),
             "area": area, "bbox": bbox}
            for i, (area, bbox) in segment_stats(img["ids"]).items()
        ]
        annotations.append(
            {"image_id": img["image_id"], "file_name": file_name, "segments_info": segments}
        )
    doc = {"images": [{"id": a["image_id"]} for a in annotations], "annotations": annotations,
           "categories": categories}
    (folder / f"{name}.json").write_text(json.dumps(doc))
    return str(folder / f"{name}.json")


def reference_pq(gt_json: str, pred_json: str) -> dict:
    """panopticapi's pq_compute on one core (its own per-image code and averaging)."""
    gt, pred = json.loads(Path(gt_json).read_text()), json.loads(Path(pred_json).read_text())
    categories = {c["id"]: c for c in gt["categories"]}
    preds = {a["image_id"]: a for a in pred["annotations"]}
    pairs = [(a, preds[a["image_id"]]) for a in gt["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        stat = panopticapi_eval.pq_compute_single_core(
            0, pairs, gt_json[: -len(".json")], pred_json[: -len(".json")], categories
        )
    results = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        results[name], per_class = stat.pq_average(categories, isthing=isthing)
        if name == "All":
            results["per_class"] = per_class
    return results


def assert_same_results(ours: dict, ref: dict, tol: float = 1e-9) -> None:
    assert set(ours) == set(ref)
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == ref[group]["n"], group
        for key in ("pq", "sq", "rq"):
            assert ours[group][key] == pytest.approx(float(ref[group][key]), abs=tol), (group, key)
    assert set(ours["per_class"]) == set(ref["per_class"])
    for cat, values in ref["per_class"].items():
        for key in ("pq", "sq", "rq"):
            assert ours["per_class"][cat][key] == pytest.approx(float(values[key]), abs=tol)


def hand_built_case() -> tuple[list[dict], list[dict]]:
    """One 20 x 24 image exercising void, crowd, split stuff, unmatched and borderline IoU."""
    gt = np.zeros((20, 24), np.int64)
    gt[:, :12] = 100  # stuff s, left part ...
    gt[:, 18:] = 101  # ... and a second segment of stuff s on the right
    gt[:, 12:18] = 110  # stuff t
    gt[0:2, :] = 0  # void strip
    gt[3:9, 2:8] = 1  # thing a #1 (36 px)
    gt[12:14, 2:4] = 2  # thing a #2 (4 px)
    gt[10:18, 13:17] = 3  # crowd of a (32 px)
    gt[3:7, 19:23] = 4  # thing b (16 px)
    gt_cats = {100: 10, 101: 10, 110: 11, 1: 1, 2: 1, 3: 1, 4: 2}

    pred = gt.copy()
    pred[gt == 0] = 0
    pred[gt == 101] = 100  # both stuff-s parts as one segment: matches only one of them
    pred[3:9, 2:8] = 100
    pred[4:10, 3:9] = 1  # a #1 shifted: IoU 25/47 > 0.5 -> TP
    pred[12:14, 2:4] = 100
    pred[12:14, 2:3] = 2  # a #2 half covered: IoU exactly 0.5 -> no match (FP + FN)
    pred[10:18, 13:16] = 3  # a inside the crowd: not a FP
    pred[0:2, 0:5] = 5  # c on void only: not a FP
    pred[2:3, 0:3] = 5
    pred[3:7, 19:23] = 6  # b predicted as c: FP for c, FN for b
    pred[16:20, 20:24] = 7  # a new thing a out of nowhere: FP
    pred_cats = {100: 10, 110: 11, 1: 1, 2: 1, 3: 1, 5: 3, 6: 3, 7: 1}
    return (
        [{"image_id": 1, "ids": gt, "cats": gt_cats, "crowd": {3}}],
        [{"image_id": 1, "ids": pred, "cats": pred_cats}],
    )


def random_case(seed: int, n_images: int = 3, size=(32, 40)) -> tuple[list[dict], list[dict]]:
    """Random rectangles as ground truth, and a prediction made by perturbing it."""
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for image_id in range(n_images):
        h, w = size
        gt = np.zeros(size, np.int64)
        cats, crowd = {}, set()
        for seg_id in range(1, int(rng.integers(4, 12))):
            y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
            gt[y : y + rng.integers(3, h // 2), x : x + rng.integers(3, w // 2)] = seg_id
            cats[seg_id] = int(rng.choice([1, 2, 10, 11]))
            if cats[seg_id] in (1, 2) and rng.uniform() < 0.2:
                crowd.add(seg_id)
        if rng.uniform() < 0.7:
            gt[rng.integers(0, h) :, : rng.integers(0, w)] = 0  # a void corner
        pred = np.roll(gt, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1)) * 10
        pred_cats = {i * 10: c for i, c in cats.items()}
        present = [i for i in np.unique(pred) if i]
        for pid in present:
            roll = rng.uniform()
            if roll < 0.15:
                pred_cats[pid] = int(rng.choice([1, 2, 3, 10, 11]))  # relabel
            elif roll < 0.25 and len(present) > 1:
                pred[pred == pid] = rng.choice(present)  # merge into another
            elif roll < 0.3:
                pred[pred == pid] = 0  # drop
        for extra in range(int(rng.integers(0, 3))):
            y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
            pred[y : y + 6, x : x + 8] = 1000 + extra
            pred_cats[1000 + extra] = int(rng.choice([1, 3, 11]))
        if rng.uniform() < 0.3:
            pred[: rng.integers(1, h // 3), :] = 0  # the model left some pixels unlabelled
        gt_cats = {i: c for i, c in cats.items() if i in set(np.unique(gt).tolist())}
        gts.append({"image_id": image_id, "ids": gt, "cats": gt_cats, "crowd": crowd})
        preds.append({"image_id": image_id, "ids": pred, "cats": pred_cats})
    return gts, preds


def test_hand_built_case_matches_panopticapi(tmp_path):
    gt, pred = hand_built_case()
    gt_json = write_panoptic(tmp_path, "gt", gt)
    pred_json = write_panoptic(tmp_path, "pred", pred)
    ours = pq_compute(gt_json, pred_json)
    assert_same_results(ours, reference_pq(gt_json, pred_json))
    # the borderline and ignore rules did what the case says they do
    stat = pq_image_stat(
        gt_segments=json.loads(Path(gt_json).read_text())["annotations"][0]["segments_info"],
        gt_ids=gt[0]["ids"],
        pred_segments=json.loads(Path(pred_json).read_text())["annotations"][0]["segments_info"],
        pred_ids=pred[0]["ids"],
        categories={c["id"] for c in CATEGORIES},
    )
    assert (stat[1].tp, stat[1].fp, stat[1].fn) == (1, 2, 1)  # a: #1 TP; #2 and new FP; #2 FN
    assert (stat[2].tp, stat[2].fn, stat[3].fp) == (0, 1, 1)  # b missed; c once (void one ignored)
    assert (stat[10].tp, stat[10].fn, stat[11].tp) == (1, 1, 1)
    assert ours["per_class"][12] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}  # no GT, no prediction
    assert ours["Stuff"]["n"] == 2 and ours["Things"]["n"] == 3


@pytest.mark.parametrize("seed", range(6))
def test_random_perturbations_match_panopticapi(tmp_path, seed):
    gt, pred = random_case(seed)
    gt_json = write_panoptic(tmp_path, "gt", gt)
    pred_json = write_panoptic(tmp_path, "pred", pred)
    assert_same_results(pq_compute(gt_json, pred_json), reference_pq(gt_json, pred_json))


def _perturb_coco(gt_ann: dict, ids: np.ndarray, categories: dict) -> tuple[np.ndarray, dict]:
    """Merge two things, drop one, shift one, relabel one stuff segment."""
    pred = ids.copy()
    segs = sorted(gt_ann["segments_info"], key=lambda s: -s["area"])
    things = [s for s in segs if categories[s["category_id"]]["isthing"] and not s["iscrowd"]]
    stuff = [s for s in segs if not categories[s["category_id"]]["isthing"]]
    cats = {s["id"]: s["category_id"] for s in segs}
    merged, dropped, shifted = things[0], things[1], things[2]
    pred[ids == things[3]["id"]] = merged["id"]  # merge the 4th into the 1st
    del cats[things[3]["id"]]
    pred[ids == dropped["id"]] = 0
    del cats[dropped["id"]]
    mask = ids == shifted["id"]
    pred[mask] = stuff[0]["id"]
    pred[np.roll(mask, (3, 4), axis=(0, 1))] = shifted["id"]
    other_stuff = [c for c, v in categories.items() if not v["isthing"]]
    cats[stuff[-1]["id"]] = next(c for c in other_stuff if c != stuff[-1]["category_id"])
    present = set(np.unique(pred).tolist()) - {0}
    return pred, {i: c for i, c in cats.items() if i in present}


def test_real_coco_images_against_themselves_and_a_perturbed_copy(tmp_path, coco_sample):
    gt_json = str(coco_sample / "panoptic_examples.json")
    gt_folder = str(coco_sample / "panoptic")
    perfect = pq_compute(gt_json, gt_json, gt_folder, gt_folder)
    assert perfect["All"]["pq"] == 1.0 and perfect["All"]["n"] == 8

    gt = json.loads(Path(gt_json).read_text())
    categories = {c["id"]: c for c in gt["categories"]}
    preds = []
    for ann in gt["annotations"]:
        ids = read_panoptic_png(f"{gt_folder}/{ann['file_name']}")
        pred, cats = _perturb_coco(ann, ids, categories)
        preds.append({"image_id": ann["image_id"], "ids": pred, "cats": cats})
    pred_json = write_panoptic(tmp_path, "pred", preds, categories=gt["categories"])
    ours = pq_compute(gt_json, pred_json, gt_folder)
    (tmp_path / "gt_copy.json").write_text(Path(gt_json).read_text())  # reference: folder = json
    (tmp_path / "gt_copy").symlink_to(gt_folder)
    ref = reference_pq(str(tmp_path / "gt_copy.json"), pred_json)
    assert_same_results(ours, ref)
    assert 0.3 < ours["All"]["pq"] < 1.0


def test_prediction_errors_say_what_is_wrong(tmp_path):
    gt, pred = hand_built_case()
    gt_json = write_panoptic(tmp_path, "gt", gt)
    segs = json.loads(Path(gt_json).read_text())["annotations"][0]["segments_info"]
    kwargs = dict(gt_segments=segs, gt_ids=gt[0]["ids"], categories={1, 2, 10, 11})
    ids = gt[0]["ids"]
    with pytest.raises(KeyError, match="in the predicted PNG but not in its segments_info"):
        pq_image_stat(pred_segments=segs[1:], pred_ids=ids, **kwargs)
    with pytest.raises(KeyError, match="not in its PNG"):
        pq_image_stat(pred_segments=segs + [{"id": 999, "category_id": 1}], pred_ids=ids, **kwargs)
    bad = [dict(s, category_id=77) if s["id"] == 4 else s for s in segs]
    with pytest.raises(KeyError, match="category_id 77"):
        pq_image_stat(pred_segments=bad, pred_ids=ids, **kwargs)
    with pytest.raises(ValueError, match="size"):
        pq_image_stat(pred_segments=segs, pred_ids=ids[:-1], **kwargs)
    other = write_panoptic(tmp_path, "other", [dict(pred[0], image_id=2)])
    with pytest.raises(KeyError, match="no prediction for the image with id 1"):
        pq_compute(gt_json, other)


def test_stat_columns_round_trip_and_merge_is_a_sum():
    a, b = PQStat(), PQStat()
    a[1].tp, a[1].iou, a[5].fp = 2, 1.5, 1
    b[1].fn, b[1].tp, b[1].iou = 1, 1, 0.75
    a += b
    back = PQStat.from_columns(a.to_columns())
    assert (back[1].tp, back[1].fn, back[1].iou, back[5].fp) == (3, 1, 2.25, 1)


def test_empty_group_gives_zero_n_instead_of_crashing():
    stat = PQStat()
    stat[1].tp, stat[1].iou = 1, 0.8
    result = pq_results(stat, {1: {"isthing": 1}})
    assert result["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    assert result["All"]["pq"] == pytest.approx(0.8)


def test_format_pq_table_is_panopticapis_table(tmp_path):
    gt, pred = hand_built_case()
    result = pq_compute(write_panoptic(tmp_path, "gt", gt), write_panoptic(tmp_path, "pred", pred))
    lines = format_pq_table(result).splitlines()
    assert lines[0].split() == ["|", "PQ", "SQ", "RQ", "N"]
    assert lines[1] == "-" * 38
    all_row = lines[2].split()
    assert all_row[0] == "All" and int(all_row[-1]) == result["All"]["n"]
    assert float(all_row[2]) == pytest.approx(100 * result["All"]["pq"], abs=0.05)
    assert [line.split()[0] for line in lines[2:]] == ["All", "Things", "Stuff"]


def test_process_pool_and_ray_give_the_local_numbers(tmp_path, ray_local):
    gt, pred = random_case(11, n_images=8)
    gt_json = write_panoptic(tmp_path, "gt", gt)
    pred_json = write_panoptic(tmp_path, "pred", pred)
    serial = pq_compute(gt_json, pred_json, workers=1)
    assert_same_results(pq_compute(gt_json, pred_json, workers=2), serial, tol=1e-12)
    assert_same_results(pq_compute(gt_json, pred_json, use_ray=True), serial, tol=1e-12)


def test_files_on_s3(tmp_path, s3_bucket):
    from model.storage import get_filesystem

    gt, pred = random_case(3)
    gt_json = write_panoptic(tmp_path, "gt", gt)
    pred_json = write_panoptic(tmp_path, "pred", pred)
    fs, _ = get_filesystem(f"s3://{s3_bucket}")
    fs.put(str(tmp_path) + "/", f"{s3_bucket}/eval/", recursive=True)
    remote = pq_compute(f"s3://{s3_bucket}/eval/gt.json", f"s3://{s3_bucket}/eval/pred.json")
    assert_same_results(remote, pq_compute(gt_json, pred_json), tol=0)


def test_group_averages_match_hotcoco_too(tmp_path):
    hotcoco = pytest.importorskip("hotcoco.panoptic")
    for index, (gt, pred) in enumerate([hand_built_case(), random_case(21), random_case(22)]):
        gt_json = write_panoptic(tmp_path / str(index), "gt", gt)
        pred_json = write_panoptic(tmp_path / str(index), "pred", pred)
        with contextlib.redirect_stdout(io.StringIO()):
            ref = hotcoco.pq_compute(gt_json, pred_json)
        ours = pq_compute(gt_json, pred_json)
        for group in ("All", "Things", "Stuff"):
            assert ours[group]["n"] == ref[group]["n"]
            for key in ("pq", "sq", "rq"):
                assert ours[group][key] == pytest.approx(ref[group][key], abs=1e-9)
