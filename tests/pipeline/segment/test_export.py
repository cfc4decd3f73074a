"""`panoray export`: a segment output as COCO panoptic, COCO instances and semantic PNGs, read
back by the tools they are for (panopticapi, pycocotools, Pillow)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from model.storage import get_filesystem
from pipeline.coco.panoptic_io import decode_panoptic_png, read_panoptic_png
from pipeline.evaluate import pq_compute
from pipeline.segment.commits import OutputStore
from pipeline.segment.export import export_output
from pipeline.segment.output import image_file_stem
from pipeline.segment.schema import encode_result, error_row, ok_row, to_table

# pycocotools 2.0.11 on numpy 2: a DeprecationWarning in its own decode, nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.mask")

GT_JSON = "panoptic_examples.json"
EXTRA_ID = "extra/IMG 0001.jpg"  # not a COCO image: a loose file, a space in its name


def _categories(coco_sample: Path) -> list[dict]:
    return json.loads((coco_sample / "panoptic_coco_categories.json").read_text())


def _prediction(ids: np.ndarray, segments: list[dict], cats: dict, seed: int):
    """The ground truth, spoilt so that PQ is neither 0 nor 1: every third segment dropped to
    void, a thing relabelled, one segment eroded."""
    ids = ids.astype(np.int64).copy()
    rng = np.random.default_rng(seed)
    out = []
    things = [c for c in cats.values() if c["isthing"]]
    for k, s in enumerate(segments):
        if k % 3 == 2:
            ids[ids == s["id"]] = 0
            continue
        category = s["category_id"]
        if k == 1 and cats[category]["isthing"]:
            category = things[(things.index(cats[category]) + 1) % len(things)]["id"]
        if k == 3:
            ys, xs = np.nonzero(ids == s["id"])
            gone = rng.random(len(ys)) < 0.6
            ids[ys[gone], xs[gone]] = 0
        out.append({"id": s["id"], "category_id": category,
                    "isthing": bool(cats[category]["isthing"]), "score": 0.5 + 0.01 * k})
    return encode_result(ids, out)


def write_output(coco_sample: Path, dst: str) -> list[dict]:
    """A segment output as a run over the COCO sample would leave it: one tar shard with both
    images (spoilt ground truth as the prediction), a loose file, an error row."""
    meta = json.loads((coco_sample / GT_JSON).read_text())
    cats = {c["id"]: c for c in _categories(coco_sample)}
    rows = []
    for i, ann in enumerate(meta["annotations"]):
        stem = ann["file_name"].rsplit(".", 1)[0]
        ids = read_panoptic_png(str(coco_sample / "panoptic" / ann["file_name"]))
        png, segments = _prediction(ids, ann["segments_info"], cats, seed=i)
        rows.append(ok_row(image_id=f"val.tar/{stem}", image_uri=f"/data/val.tar#{stem}.jpg",
                           shard="val.tar", width=ids.shape[1], height=ids.shape[0],
                           panoptic_png=png, segments_info=segments, model_id="m@0"))
    rows.append(error_row(image_id="val.tar/broken", image_uri="/data/val.tar#broken.jpg",
                          shard="val.tar", error="truncated JPEG", model_id="m@0"))
    OutputStore(dst).commit_shard("val.tar", to_table(rows))
    extra = np.zeros((20, 30), np.int64)
    extra[2:9, 3:12], extra[10:, :] = 1, 2
    png, segments = encode_result(extra, [
        {"id": 1, "category_id": 1, "isthing": True, "score": 0.9},
        {"id": 2, "category_id": 184, "isthing": False, "score": 0.8}])
    OutputStore(dst).commit_shard("extra", to_table([ok_row(
        image_id=EXTRA_ID, image_uri=f"/data/{EXTRA_ID}", shard="extra", width=30, height=20,
        panoptic_png=png, segments_info=segments, model_id="m@0")]))
    return rows


@pytest.fixture(scope="module")
def output(coco_sample, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("export") / "out")
    write_output(coco_sample, out)
    return out


def _ok_rows(output_uri: str) -> list[dict]:
    from pipeline.segment.output import read_output_rows

    return [r for r in read_output_rows(output_uri) if r["status"] == "ok"]


def test_coco_panoptic_scores_as_the_output_does(output, coco_sample, tmp_path, capsys):
    cats_file = str(coco_sample / "panoptic_coco_categories.json")
    code = main(["export", output, str(tmp_path / "pan"), "--format", "coco-panoptic",
                 "--categories", cats_file])
    assert code == 0
    assert "exported 3 images" in capsys.readouterr().out
    doc = json.loads((tmp_path / "pan" / "panoptic.json").read_text())
    assert [c["id"] for c in doc["categories"]] == [c["id"] for c in _categories(coco_sample)]
    assert len(doc["images"]) == len(doc["annotations"]) == 3  # the error row is not there
    by_id = {img["id"]: img for img in doc["images"]}
    assert {142238, 439180} <= set(by_id)  # COCO numbers: evaluable against COCO as it is
    [extra] = [img for img in doc["images"] if img["panoray_image_id"] == EXTRA_ID]
    assert extra["id"] >= 2**40 and extra["file_name"] == image_file_stem(EXTRA_ID) + ".jpg"
    for ann in doc["annotations"]:
        assert (tmp_path / "pan" / "panoptic" / ann["file_name"]).is_file()

    gt_json = str(coco_sample / GT_JSON)
    ours = pq_compute(gt_json, str(tmp_path / "pan" / "panoptic.json"),
                      str(coco_sample / "panoptic"), workers=1)
    assert 0.2 < ours["All"]["pq"] < 0.9
    assert main(["evaluate", output, gt_json, "--gt-folder", str(coco_sample / "panoptic"),
                 "--out", str(tmp_path / "pq.json")]) == 0
    cli = json.loads((tmp_path / "pq.json").read_text())["results"]
    for group in ("All", "Things", "Stuff"):
        for key in ("pq", "sq", "rq", "n"):
            assert ours[group][key] == pytest.approx(cli[group][key], abs=1e-12), (group, key)

    reference = pytest.importorskip("panopticapi.evaluation")  # panopticapi's own code
    gt = json.loads(Path(gt_json).read_text())
    preds = {a["image_id"]: a for a in doc["annotations"]}
    pairs = [(a, preds[a["image_id"]]) for a in gt["annotations"]]
    categories = {c["id"]: c for c in gt["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):
        stat = reference.pq_compute_single_core(0, pairs, str(coco_sample / "panoptic"),
                                                str(tmp_path / "pan" / "panoptic"), categories)
    ref, _ = stat.pq_average(categories, isthing=None)
    assert ref["pq"] == pytest.approx(cli["All"]["pq"], abs=1e-12)


def test_coco_instances_are_exactly_the_thing_segments(output, coco_sample, tmp_path):
    coco = pytest.importorskip("pycocotools.coco")
    mask_api = pytest.importorskip("pycocotools.mask")
    summary = export_output(output, str(tmp_path / "inst"), format="coco-instances",
                            categories=str(coco_sample / "panoptic_coco_categories.json"))
    assert (summary.images, summary.errors_skipped) == (3, 1)
    with contextlib.redirect_stdout(io.StringIO()):
        api = coco.COCO(str(tmp_path / "inst" / "instances.json"))
    thing_ids = {c["id"] for c in _categories(coco_sample) if c["isthing"]}
    assert set(api.getCatIds()) == thing_ids
    seen = 0
    for row in _ok_rows(output):
        [image] = [i for i in api.dataset["images"] if i["panoray_image_id"] == row["image_id"]]
        ids = decode_panoptic_png(row["panoptic_png"])
        things = [s for s in row["segments_info"] if s["category_id"] in thing_ids]
        anns = api.loadAnns(api.getAnnIds(imgIds=[image["id"]]))
        assert [(a["category_id"], a["area"]) for a in anns] == [
            (s["category_id"], s["area"]) for s in things]
        for ann, segment in zip(anns, things):
            mask = api.annToMask(ann).astype(bool)
            assert np.array_equal(mask, ids == segment["id"]), (row["image_id"], segment["id"])
            assert mask_api.area(ann["segmentation"]) == segment["area"]
            assert list(mask_api.toBbox(ann["segmentation"])) == list(segment["bbox"])
            assert ann["iscrowd"] == 0 and ann["score"] == pytest.approx(segment["score"])
        seen += len(things)
    assert seen == summary.segments > 10


def test_semantic_pngs_hold_class_indices(output, coco_sample, tmp_path):
    cats = _categories(coco_sample)
    summary = export_output(output, str(tmp_path / "sem"), format="semantic-png",
                            categories=str(coco_sample / "panoptic_coco_categories.json"))
    assert summary.images == 3
    classes = json.loads((tmp_path / "sem" / "classes.json").read_text())["classes"]
    assert classes[0]["name"] == "background" and classes[0]["id"] is None
    assert [c["id"] for c in classes[1:]] == [c["id"] for c in cats]
    labelmap = (tmp_path / "sem" / "labelmap.txt").read_text().splitlines()
    assert labelmap[0].startswith("#") and labelmap[1] == "background:0,0,0::"
    assert labelmap[2] == f"{cats[0]['name']}:{','.join(map(str, cats[0]['color']))}::"
    index = {c["id"]: c["index"] for c in classes[1:]}
    manifest = [json.loads(line) for line in
                (tmp_path / "sem" / "images.jsonl").read_text().splitlines()]
    assert len(manifest) == 3
    names = (tmp_path / "sem" / "ImageSets" / "Segmentation" / "default.txt").read_text().split()
    for row in _ok_rows(output):
        name = image_file_stem(row["image_id"])
        assert name in names
        picture = Image.open(tmp_path / "sem" / "SegmentationClass" / f"{name}.png")
        assert picture.mode == "P"  # 134 classes: 8 bits, the class colours as the palette
        got = np.asarray(picture)
        ids = decode_panoptic_png(row["panoptic_png"])
        expected = np.zeros(ids.shape, np.uint8)
        for s in row["segments_info"]:
            expected[ids == s["id"]] = index[s["category_id"]]
        assert np.array_equal(got, expected)
        palette = np.asarray(picture.getpalette()).reshape(-1, 3)
        assert palette[index[cats[0]["id"]]].tolist() == cats[0]["color"]


def test_many_classes_give_16_bit_pngs(tmp_path):
    cats = [{"id": 1000 + i, "name": f"c{i}", "isthing": i % 2 == 0} for i in range(300)]
    (tmp_path / "cats.json").write_text(json.dumps(cats))
    ids = np.zeros((8, 9), np.int64)
    ids[:4], ids[4:, :3] = 1, 2
    png, segments = encode_result(ids, [{"id": 1, "category_id": 1299, "isthing": False},
                                        {"id": 2, "category_id": 1000, "isthing": True}])
    OutputStore(str(tmp_path / "out")).commit_shard("s", to_table([ok_row(
        image_id="s/a.png", image_uri="/x/s/a.png", shard="s", width=9, height=8,
        panoptic_png=png, segments_info=segments, model_id="m@0")]))
    export_output(str(tmp_path / "out"), str(tmp_path / "sem"), format="semantic-png",
                  categories=str(tmp_path / "cats.json"))
    picture = Image.open(tmp_path / "sem" / "SegmentationClass" /
                         f"{image_file_stem('s/a.png')}.png")
    assert picture.mode in ("I;16", "I")  # 301 indices: 16-bit greyscale
    got = np.asarray(picture)
    assert got[0, 0] == 300 and got[5, 0] == 1 and got[5, 5] == 0


def test_local_and_s3_exports_are_the_same(output, coco_sample, tmp_path, s3_bucket):
    """OUT and DST on S3 (moto): the same files, the same JSON, as a local export."""
    remote_out = f"s3://{s3_bucket}/out"
    write_output(coco_sample, remote_out)
    cats = str(coco_sample / "panoptic_coco_categories.json")
    export_output(remote_out, f"s3://{s3_bucket}/pan", categories=cats)
    export_output(output, str(tmp_path / "pan"), categories=cats)
    fs, _ = get_filesystem(f"s3://{s3_bucket}")
    remote = json.loads(fs.cat_file(f"{s3_bucket}/pan/panoptic.json"))
    local = json.loads((tmp_path / "pan" / "panoptic.json").read_text())
    assert remote.pop("info")["description"].endswith(remote_out)
    local.pop("info")
    assert remote == local
    pngs = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/pan/panoptic"))
    assert pngs == sorted(p.name for p in (tmp_path / "pan" / "panoptic").iterdir())
    for name in pngs:
        assert fs.cat_file(f"{s3_bucket}/pan/panoptic/{name}") == \
            (tmp_path / "pan" / "panoptic" / name).read_bytes()


def test_names_are_stable_and_errors_counted_with_progress(output, tmp_path, caplog):
    bundle_cats = [{"id": c, "name": f"c{c}", "isthing": True} for c in range(1, 201)]
    (tmp_path / "cats.json").write_text(json.dumps({"categories": bundle_cats}))
    with caplog.at_level(logging.INFO, logger="pipeline.segment.export"):
        first = export_output(output, str(tmp_path / "a"), categories=str(tmp_path / "cats.json"),
                              progress_every_s=0)
    assert first.errors_skipped == 1 and first.images == 3
    progress = [r.getMessage() for r in caplog.records if "error rows skipped" in r.getMessage()]
    assert any("3 of 3 images" in m for m in progress), progress
    export_output(output, str(tmp_path / "b"), categories=str(tmp_path / "cats.json"))
    assert (tmp_path / "a" / "panoptic.json").read_bytes() == \
        (tmp_path / "b" / "panoptic.json").read_bytes()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("command, line", [("export", "export coco-panoptic: 3 of 3 images"),
                                           ("show", "show: 3 of 3 overlays")])
def test_progress_is_log_lines_off_a_terminal_and_one_line_redrawn_on_one(
        command, line, output, coco_sample, tmp_path, capsys, caplog, monkeypatch):
    import pipeline.progress

    cats = str(coco_sample / "panoptic_coco_categories.json")
    argv = [command, output, str(tmp_path / "a"), "--categories", cats]
    monkeypatch.setattr(pipeline.progress, "EVERY_S", 0.0)  # in a log: a record per image
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert "\r" not in capsys.readouterr().err  # stderr is no terminal here: never a redraw
    records = [r.getMessage() for r in caplog.records if r.getMessage().startswith(line[:6])]
    assert len([m for m in records if " of 3 " in m]) == 3 and line in records[-1], records

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main([*argv[:2], str(tmp_path / "b"), *argv[3:], "--no-progress"]) == 0
    assert not [r for r in caplog.records if " of 3 " in r.getMessage()]

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with caplog.at_level(logging.INFO):
        assert main([*argv[:2], str(tmp_path / "c"), *argv[3:]]) == 0
    drawn = terminal.getvalue()
    assert f"\r{line}" in drawn and drawn.endswith("\n"), drawn  # the line, then below it
    assert not [r for r in caplog.records if " of 3 " in r.getMessage()]


def test_categories_missing_from_the_label_space_are_refused_before_writing(output, tmp_path):
    (tmp_path / "cats.json").write_text(json.dumps([{"id": 1, "name": "a", "isthing": 1}]))
    with pytest.raises(ValueError, match="does not list"):
        export_output(output, str(tmp_path / "x"), categories=str(tmp_path / "cats.json"))
    assert not (tmp_path / "x").exists()
