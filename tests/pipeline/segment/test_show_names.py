"""`show` writes one overlay per image, also for the many members of one tar shard, under a name
that is unique and the same on every run (the export's naming helper)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from segment_helpers import image_bytes, tar_shard

from pipeline.segment.commits import OutputStore
from pipeline.segment.decode import decode_image
from pipeline.segment.output import image_file_stem
from pipeline.segment.schema import encode_result, ok_row, to_table
from pipeline.segment.show import show
from pipeline.segment.sources import iter_shard_records, list_shards


def test_every_member_of_a_shard_gets_its_own_overlay(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    members = {f"{k:06d}.jpg": image_bytes(k, size=(40 + 4 * k, 30)) for k in range(3)}
    (src / "shard-0.tar").write_bytes(tar_shard(members))
    (src / "a" / "b.jpg").write_bytes(image_bytes(7))
    (src / "a__b.jpg").write_bytes(image_bytes(8))  # sanitises as a/b.jpg does
    rows = []
    for shard in list_shards(str(src)):
        for rec in iter_shard_records(shard):
            h, w = decode_image(rec["data"]).array.shape[:2]
            ids = np.zeros((h, w), np.int64)
            ids[: h // 2] = 1
            png, segments = encode_result(ids, [{"id": 1, "category_id": 1, "isthing": True}])
            rows.append(ok_row(image_id=rec["image_id"], image_uri=rec["image_uri"],
                               shard=rec["shard"], width=w, height=h, panoptic_png=png,
                               segments_info=segments, model_id="m@0"))
    assert len(rows) == 5
    OutputStore(str(tmp_path / "out")).commit_shard("all", to_table(rows))

    summary = show(str(tmp_path / "out"), str(tmp_path / "pics"))
    assert summary.skipped == []
    assert len(summary.written) == len(set(summary.written)) == 5
    names = {r["image_id"]: image_file_stem(r["image_id"]) + ".png" for r in rows}
    assert sorted(p.rsplit("/", 1)[-1] for p in summary.written) == sorted(names.values())
    for row in rows:  # each picture is its own image's (sizes differ between members)
        picture = Image.open(tmp_path / "pics" / names[row["image_id"]])
        assert picture.size == (row["width"], row["height"])
    again = show(str(tmp_path / "out"), str(tmp_path / "pics2"))
    assert [p.rsplit("/", 1)[-1] for p in again.written] == \
        [p.rsplit("/", 1)[-1] for p in summary.written]


def test_file_names_are_safe_unique_and_stable():
    ids = ["shard-0.tar/000001", "shard-0.tar/000002", "shard-1.tar/000001", "a/b.jpg",
           "a__b.jpg", "a/b.png", "../../etc/passwd", ".hidden", "x" * 500 + "/y.jpg",
           "über/日本.jpg", "a b/c:d?.jpg"]
    names = [image_file_stem(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert names == [image_file_stem(i) for i in ids]  # a pure function of the image_id
    assert names[0].startswith("shard-0.tar__000001-") and names[3].startswith("a__b-")
    for name in names:
        assert "/" not in name and not name.startswith(".") and len(name) <= 110
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in name), name
