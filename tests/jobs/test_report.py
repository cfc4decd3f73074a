"""`panoray report`: the page's numbers are the output's (counted here again, independently, from
the Parquet rows with pyarrow), its PQ is `panoray evaluate`'s, every file it links exists and
nothing comes from the network, and a real browser (Debian's Chromium, headless) shows it with
every gallery picture loaded.

The output is built directly (no Ray, no model): the ground truth of a small synthetic dataset,
altered image by image so that PQ is not 1, committed as three shards (a tar, loose files, a
shard with error rows), plus one row whose original image is gone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from segment_helpers import commit_ground_truth_as_output

from jobs.cli import main
from jobs.demo import SHIPPED_MODEL
from pipeline.coco.panoptic_io import read_panoptic_png
from pipeline.coco.synth import make_synthetic_dataset
from pipeline.segment.commits import OutputStore
from pipeline.segment.output import image_file_stem
from pipeline.segment.report import PER_PAGE, make_report
from pipeline.segment.schema import encode_result, error_row, ok_row, to_table
from pipeline.segment.tar import tar_bytes

CHROMIUM = "/usr/bin/chromium"
BROWSER_TIMEOUT_S = 120
WINDOW = (1280, 2000)
NUM_VAL = 32  # ground-truth images; the last 3 become error rows
ERROR_MESSAGES = ["cannot decode image: truncated <JPEG> & more", "image too large: 9000 x 9000",
                  "image too large: 9000 x 9000"]


# ------------------------------------------------------------------------------- the output

def _altered(ids: np.ndarray, segments: list[dict], k: int, cats: dict[int, dict]):
    """The ground truth of image k, altered: kept (k % 3 == 0), its largest thing dropped
    (k % 3 == 1), or one stuff segment given another stuff class (k % 3 == 2)."""
    ids = ids.copy()
    segments = [{"id": s["id"], "category_id": s["category_id"],
                 "isthing": bool(cats[s["category_id"]]["isthing"]),
                 "score": 0.5 + 0.01 * (k % 40)} for s in segments]
    things = [s for s in segments if s["isthing"]]
    stuff = [s for s in segments if not s["isthing"]]
    if k % 3 == 1 and things:
        drop = max(things, key=lambda s: int((ids == s["id"]).sum()))
        ids[ids == drop["id"]] = 0
        segments.remove(drop)
    elif k % 3 == 2 and stuff:
        other = sorted(c for c, v in cats.items() if not v["isthing"])
        stuff[0]["category_id"] = other[(other.index(stuff[0]["category_id"]) + 1) % len(other)]
    return ids, segments


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    w = tmp_path_factory.mktemp("report")
    make_synthetic_dataset(str(w / "syn"), num_train=0, num_val=NUM_VAL, image_size=(64, 64),
                           seed=5)
    val = w / "syn" / "val"
    gt = json.loads((val / "panoptic.json").read_text())
    cats = {c["id"]: c for c in gt["categories"]}
    (w / "archive").mkdir()
    (w / "loose").mkdir()
    tar_members, shards = {}, {"shard-0.tar": [], "loose-0": [], "loose-1": []}
    for k, ann in enumerate(sorted(gt["annotations"], key=lambda a: a["file_name"])):
        stem = ann["file_name"].rsplit(".", 1)[0]
        jpg = (val / "images" / f"{stem}.jpg").read_bytes()
        if k >= NUM_VAL - len(ERROR_MESSAGES):
            shards["loose-1"].append(error_row(
                image_id=f"loose/{stem}.jpg", image_uri=str(w / "loose" / f"{stem}.jpg"),
                shard="loose-1", error=ERROR_MESSAGES[k - NUM_VAL + len(ERROR_MESSAGES)],
                model_id="demo@test"))
            continue
        ids, segments = _altered(read_panoptic_png(str(val / "panoptic" / ann["file_name"])),
                                 ann["segments_info"], k, cats)
        png, segments = encode_result(ids, segments)
        if k < 12:
            tar_members[f"{stem}.jpg"] = jpg
            image_id, uri, shard = (f"shard-0.tar/{stem}", f"{w}/archive/shard-0.tar#{stem}.jpg",
                                    "shard-0.tar")
        else:
            (w / "loose" / f"{stem}.jpg").write_bytes(jpg)
            image_id, uri, shard = f"loose/{stem}.jpg", str(w / "loose" / f"{stem}.jpg"), "loose-0"
        shards[shard].append(ok_row(image_id=image_id, image_uri=uri, shard=shard, width=64,
                                    height=64, panoptic_png=png, segments_info=segments,
                                    model_id="demo@test"))
    # an ok row whose original is gone (drawn over grey) and that no ground truth names
    ghost = np.zeros((64, 48), np.int64)
    ghost[10:40, 5:30] = 1
    png, segments = encode_result(ghost, [{"id": 1, "category_id": 1, "isthing": True,
                                           "score": 0.9}])
    shards["loose-1"].append(ok_row(image_id="gone/ghost.jpg", image_uri=str(w / "gone.jpg"),
                                    shard="loose-1", width=48, height=64, panoptic_png=png,
                                    segments_info=segments, model_id="demo@test"))
    (w / "archive" / "shard-0.tar").write_bytes(tar_bytes(tar_members))
    store = OutputStore(str(w / "out"))
    for shard, rows in shards.items():
        store.commit_shard(shard, to_table(rows))
    return {"w": w, "out": str(w / "out"), "gt": str(val / "panoptic.json"),
            "bundle": str(SHIPPED_MODEL)}


@pytest.fixture(scope="module")
def report(world) -> dict:
    """`panoray report` of the output, with the bundle's names and the ground truth; and
    `panoray evaluate` of the same output against the same ground truth."""
    dst = world["w"] / "report"
    code = main(["report", world["out"], str(dst), "--model", world["bundle"], "--gt",
                 world["gt"], "--limit", "30"])
    assert code == 0
    code = main(["evaluate", world["out"], world["gt"], "--out", str(world["w"] / "pq.json")])
    assert code == 0
    page = (dst / "report.html").read_text()
    tree = _Tree()
    tree.feed(page)
    return {"dst": dst, "html": page, "tree": tree.root,
            "pq": json.loads((world["w"] / "pq.json").read_text())["results"]}


def _rows(out: str) -> list[dict]:
    """Every row of the output, read with pyarrow alone."""
    files = sorted(Path(out, "data").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


# ------------------------------------------------------------------------- reading the page

class _Tree(HTMLParser):
    """The page as nested dicts: tag, attrs, children, text (all text inside the element)."""

    VOID = {"meta", "img", "br", "hr", "input", "link", "source"}

    def __init__(self):
        super().__init__()
        self.root = {"tag": "root", "attrs": {}, "children": [], "text": ""}
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = {"tag": tag, "attrs": dict(attrs), "children": [], "text": ""}
        self.stack[-1]["children"].append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i]["tag"] == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        for node in self.stack:
            node["text"] += data


def _all(node: dict, tag: str | None = None, **attrs: str):
    for child in node["children"]:
        if (tag is None or child["tag"] == tag) and all(
                child["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items()):
            yield child
        yield from _all(child, tag, **attrs)


def _one(node: dict, tag: str | None = None, **attrs: str) -> dict:
    found = list(_all(node, tag, **attrs))
    assert len(found) == 1, (tag, attrs, len(found))
    return found[0]


def _by_id(tree: dict, element_id: str) -> dict:
    return _one(tree, id=element_id)


def _number(text: str) -> int:
    return int(text.strip().replace(",", ""))


def _table_rows(tree: dict, table_id: str, key: str) -> dict[str, list[dict]]:
    """{tr's `key` attribute: its td cells} of a table."""
    return {tr["attrs"][key]: list(_all(tr, "td")) for tr in _all(_by_id(tree, table_id), "tr")
            if key in tr["attrs"]}


# ------------------------------------------------------------------------------------ tests

def test_run_summary_and_error_rows_are_the_outputs(report, world):
    rows = _rows(world["out"])
    ok = [r for r in rows if r["status"] == "ok"]
    errors = [r for r in rows if r["status"] == "error"]
    tree = report["tree"]
    expected = {"images": len(rows), "ok": len(ok), "failed": len(errors),
                "shards": len({r["shard"] for r in rows}),
                "segments": sum(len(r["segments_info"]) for r in ok)}
    assert (len(ok), len(errors)) == (NUM_VAL - 3 + 1, 3)
    for key, value in expected.items():
        card = _by_id(tree, f"stat-{key}")
        assert int(card["attrs"]["data-value"]) == value, key
        assert _number(_one(card, "b")["text"]) == value, key
    assert _by_id(tree, "model-ids")["text"].strip() == "demo@test"
    assert _number(_by_id(tree, "error-count")["text"]) == len(errors)
    listed = [[td["text"].strip() for td in tr["children"]] for tr in
              _all(_one(_by_id(tree, "error-table"), "tbody"), "tr")]
    assert sorted((r[1], r[3]) for r in listed) == sorted(
        (r["image_id"], r["error"]) for r in errors)
    assert "&lt;JPEG&gt; &amp; more" in report["html"]  # escaped, not markup
    commonest = _one(tree, "ul", **{"class": "messages"})
    assert re.sub(r"\s+", " ", commonest["text"]).strip().startswith(
        "2 image too large: 9000 x 9000")


def test_per_class_counts_and_areas_are_counted_from_the_rows(report, world):
    ok = [r for r in _rows(world["out"]) if r["status"] == "ok"]
    segments, images, area = Counter(), Counter(), Counter()
    pixels = sum(r["width"] * r["height"] for r in ok)
    share_sum = Counter()
    for r in ok:
        here = Counter()
        for s in r["segments_info"]:
            segments[s["category_id"]] += 1
            area[s["category_id"]] += s["area"]
            here[s["category_id"]] += s["area"]
        for cat, a in here.items():
            images[cat] += 1
            share_sum[cat] += a / (r["width"] * r["height"])
    table = _table_rows(report["tree"], "class-table", "data-category")
    assert set(map(int, table)) == set(segments)
    for cat, cells in table.items():
        cat = int(cat)
        values = [c["attrs"].get("data-v") for c in cells]
        assert int(values[2]) == segments[cat] == _number(cells[2]["text"])
        assert int(values[3]) == images[cat]
        assert float(values[4]) == pytest.approx(area[cat] / pixels, rel=1e-12)
        assert float(values[6]) == pytest.approx(share_sum[cat] / images[cat], rel=1e-12)
    order = [int(c) for c in table]  # sorted by segments, most first
    assert [segments[c] for c in order] == sorted(segments.values(), reverse=True)
    first = table[str(order[0])][0]
    assert first["text"].strip() and "sw" in _one(first, "i")["attrs"]["class"]


def test_pq_is_what_panoray_evaluate_says(report):
    expected = report["pq"]
    assert 0.3 < expected["All"]["pq"] < 0.95  # the alterations cost something
    summary = _table_rows(report["tree"], "pq-summary", "data-group")
    for group in ("All", "Things", "Stuff"):
        cells = summary[group]
        for cell, key in zip(cells, ("pq", "sq", "rq")):
            assert float(cell["attrs"]["data-v"]) == expected[group][key], (group, key)
            assert cell["text"].strip() == f"{100 * expected[group][key]:.1f}"
        assert int(cells[3]["text"]) == expected[group]["n"]
    per_class = _table_rows(report["tree"], "pq-classes", "data-category")
    assert set(per_class) == set(expected["per_class"])  # every class is in this ground truth
    for cat, cells in per_class.items():
        for cell, key in zip(cells[2:5], ("pq", "sq", "rq")):
            assert float(cell["attrs"]["data-v"]) == expected["per_class"][cat][key], (cat, key)
            assert cell["text"].strip() == f"{100 * expected['per_class'][cat][key]:.1f}"
    assert float(_by_id(report["tree"], "stat-pq")["attrs"]["data-value"]) == \
        expected["All"]["pq"]


def test_every_linked_file_exists_and_nothing_comes_from_the_network(report, world):
    page, dst = report["html"], report["dst"]
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    files = [link for link in links if not link.startswith("#")]
    assert files, "no pictures linked"
    for link in files:
        assert not re.match(r"^[a-z][a-z0-9+.-]*:|^//", link), f"{link} is not a relative file"
        assert (dst / link).is_file(), f"{link} is linked but missing"
    assert "url(" not in page and "@import" not in page
    assert not re.search(r"<(?:link|iframe|object|embed)\b", page)
    ok = sorted(r["image_id"] for r in _rows(world["out"]) if r["status"] == "ok")
    tiles = list(_all(report["tree"], "figure"))
    assert [t["attrs"]["data-image-id"] for t in tiles] == ok[:30]
    for tile in tiles:
        stem = image_file_stem(tile["attrs"]["data-image-id"])
        assert _one(tile, "img")["attrs"]["src"] == f"overlays/thumbs/{stem}.jpg"
        assert _one(tile, "a")["attrs"]["href"] == f"overlays/{stem}.png"
        full = Image.open(dst / "overlays" / f"{stem}.png")
        assert max(full.size) >= 384  # small images are enlarged: names stay legible
    grey = next(t for t in tiles if t["attrs"]["data-image-id"] == "gone/ghost.jpg")
    assert "original unreadable" in grey["text"]


def test_the_gallery_is_paged(report):
    pages = [s for s in _all(report["tree"], "section") if "page" in
             s["attrs"].get("class", "").split()]
    assert [len(list(_all(p, "figure"))) for p in pages] == [PER_PAGE, 30 - PER_PAGE]
    pager = next(_all(report["tree"], "nav", **{"class": "pager"}))
    assert [a["attrs"]["href"] for a in _all(pager, "a") if "data-page" in a["attrs"]] == \
        ["#page-1", "#page-2"]
    chips = list(_all(pages[0], "span", **{"class": "chip"}))
    assert chips and all(c["text"].strip() for c in chips)  # class names under each picture


def test_without_names_or_ground_truth_and_progress_on_the_log(world, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.segment.report"):
        summary = make_report(world["out"], str(tmp_path / "r"), limit=2, progress_every_s=0)
    assert (summary.images_ok, summary.images_failed, summary.overlays) == (NUM_VAL - 2, 3, 2)
    page = (tmp_path / "r" / "report.html").read_text()
    assert "No ground truth given" in page and "classes are named by id" in page
    assert re.search(r">class \d+<", page)
    assert any(m.startswith("report, reading: ") and " rows (" in m for m in caplog.messages)
    assert any(m.startswith("report, drawing: 2 of 2 overlays") for m in caplog.messages)
    make_report(world["out"], str(tmp_path / "none"), limit=0)
    assert "gallery is off" in (tmp_path / "none" / "report.html").read_text()
    assert not list((tmp_path / "none" / "overlays").rglob("*.*"))


def test_real_photos_with_a_categories_file_and_a_gt_folder(coco_sample, tmp_path, capsys):
    """The two COCO photos, predicted as their ground truth: PQ 100, the 125 COCO classes that
    neither holds are left out of the per-class table, the overlays keep the photos' size."""
    cats_file, meta, cats, rows = commit_ground_truth_as_output(
        coco_sample, str(tmp_path / "out"), image_id=lambda stem: f"val2017/{stem}.jpg",
        image_uri=lambda stem: str(coco_sample / "images" / f"{stem}.jpg"))
    code = main(["report", str(tmp_path / "out"), str(tmp_path / "r"), "--categories",
                 str(cats_file), "--gt", str(coco_sample / "panoptic_examples.json"),
                 "--gt-folder", str(coco_sample / "panoptic")])
    assert code == 0, capsys.readouterr().err
    page = (tmp_path / "r" / "report.html").read_text()
    tree = _Tree()
    tree.feed(page)
    listed = _table_rows(tree.root, "pq-classes", "data-category")
    held = {s["category_id"] for a in meta["annotations"] for s in a["segments_info"]}
    assert set(map(int, listed)) == held
    assert f"{len(cats) - len(held)} classes with neither ground truth nor predictions" in page
    assert all(float(c[2]["attrs"]["data-v"]) == 1.0 for c in listed.values())
    names = {_one(c[0], "span", **{"class": "name"})["text"] for c in listed.values()}
    assert names == {cats[c]["name"] for c in held}
    for row in rows:
        full = Image.open(tmp_path / "r" / "overlays" / f"{image_file_stem(row['image_id'])}.png")
        assert full.size == (row["width"], row["height"])
    assert "Page 1 of" not in page and 'class="pager"' not in page  # one page: no pager


def test_the_report_goes_to_object_storage(world, s3_bucket, capsys):
    from model.storage import get_filesystem

    dst = f"s3://{s3_bucket}/reports/run-1"
    assert main(["report", world["out"], dst, "--limit", "3"]) == 0
    assert f"wrote {dst}/report.html" in capsys.readouterr().out
    fs, root = get_filesystem(dst)
    names = sorted(p[len(root) + 1:] for p in fs.find(root))
    page = fs.cat_file(f"{root}/report.html").decode()
    linked = sorted(set(re.findall(r'(?:src|href)="(overlays/[^"]+)"', page)))
    assert len(linked) == 6 and set(linked) <= set(names)
    assert names == sorted(linked + ["report.html"])


def test_a_label_space_that_disagrees_with_the_ground_truth_is_one_sentence(world, tmp_path,
                                                                            capsys):
    (tmp_path / "gt").mkdir()
    doc = json.loads(Path(world["gt"]).read_text())
    doc["categories"] = [c for c in doc["categories"] if c["id"] != 1]
    gt = tmp_path / "gt" / "panoptic.json"
    gt.write_text(json.dumps(doc))
    os.symlink(Path(world["gt"]).with_suffix(""), tmp_path / "gt" / "panoptic")
    code = main(["report", world["out"], str(tmp_path / "r"), "--gt", str(gt)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("panoray report: error:") and "\n" not in err, err
    assert "category_id 1" in err
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------- a real browser

def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: run `make browser` (CI does, "
                    "before `make test`)")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_a_real_browser_shows_the_report_with_every_picture(report, tmp_path):
    url = (report["dst"] / "report.html").resolve().as_uri()
    shot = tmp_path / "report.png"
    _chromium(tmp_path, f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}", url)
    assert shot.is_file()
    picture = np.asarray(Image.open(shot).convert("RGB"))
    assert picture.shape[:2] == WINDOW[::-1]
    packed = (picture[..., 0].astype(np.int64) << 16) | (picture[..., 1].astype(np.int64) << 8) \
        | picture[..., 2]
    colours, counts = np.unique(packed, return_counts=True)
    assert len(colours) > 1000, f"{len(colours)} colours: a blank page?"
    assert counts.max() < 0.9 * packed.size  # not one colour everywhere

    vivid = (picture.max(-1).astype(int) - picture.min(-1)) > 80  # class colours, not greys
    assert vivid.mean() > 0.01, f"{vivid.mean():.1%} colourful pixels: no swatches, bars?"

    # the gallery's pictures: every one on the page shown has loaded (the page's own script
    # counts them once they have settled: loaded, or failed)
    for hash_, shown in (("", PER_PAGE), ("#page-2", 30 - PER_PAGE)):
        dom = _chromium(tmp_path, "--dump-dom", url + hash_).stdout
        loaded = re.search(r'<html[^>]*\bdata-images-loaded="(\d+)"', dom)
        total = re.search(r'<html[^>]*\bdata-images-shown="(\d+)"', dom)
        assert loaded and total, "the page's script did not run"
        assert (int(total.group(1)), int(loaded.group(1))) == (shown, shown), hash_
        assert 'class="tile broken"' not in dom
