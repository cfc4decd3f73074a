"""list_shards / iter_shard_records over local folders and S3 (moto): tar, Parquet, loose files."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.storage import get_filesystem
from pipeline.segment.sources import Shard, iter_shard_records, list_shards


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _parquet(table: pa.Table, **kwargs) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kwargs)
    return buf.getvalue()


# A source tree with one shard of each kind and some things that are not inputs. Image bytes are
# placeholders: sources never decode, they hand bytes on.
TREE = {
    "shards/part-0000.tar": _tar([
        ("k0.jpg", b"jpg-0"), ("k0.json", b"{}"),
        ("k1.png", b"png-1"), ("k1.jpg", b"jpg-1"),  # jpg is preferred over png
        ("sub/k2.seg.png", b"mask-2"), ("sub/k2.JPEG", b"jpeg-2"),  # k2.seg.png is no image
        ("k3.txt", b"only text: not an input"),
    ]),
    "tables/part-0.parquet": _parquet(pa.table({
        "key": ["x", "y", "z"],
        "label": [1, 2, 3],
        "image": pa.array([b"pq-x", None, b"pq-z"], type=pa.binary()),
    })),
    "photos/a.jpg": b"file-a",
    "photos/2024/b.png": b"file-b",
    "photos/c[1].jpg": b"file-c",  # a name that is also a glob pattern
    "photos/_SUCCESS": b"",
    ".hidden/c.jpg": b"hidden",
    "notes.txt": b"not an image",
}
EXPECTED = {  # image_id -> (data, error word)
    "shards/part-0000.tar/k0": (b"jpg-0", None),
    "shards/part-0000.tar/k1": (b"jpg-1", None),
    "shards/part-0000.tar/sub/k2": (b"jpeg-2", None),
    "tables/part-0.parquet/x": (b"pq-x", None),
    "tables/part-0.parquet/y": (None, "null"),
    "tables/part-0.parquet/z": (b"pq-z", None),
    "photos/a.jpg": (b"file-a", None),
    "photos/2024/b.png": (b"file-b", None),
    "photos/c[1].jpg": (b"file-c", None),
}


def _write_tree(root_uri: str, tree: dict[str, bytes]) -> None:
    fs, root = get_filesystem(root_uri)
    for rel, data in tree.items():
        if "file" in fs.protocol:  # object stores have no folders to make
            Path(root, rel).parent.mkdir(parents=True, exist_ok=True)
        fs.pipe_file(f"{root}/{rel}", data)


@pytest.fixture(params=["local", "s3"])
def source_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "src")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/src"


def test_every_shard_kind_lists_and_reads(source_uri):
    _write_tree(source_uri, TREE)
    shards = list_shards(source_uri, files_per_shard=1)
    assert {(s.kind, s.id.split("/")[0]) for s in shards} == {
        ("tar", "shards"), ("parquet", "tables"), ("files", "photos")
    }
    assert [s.id for s in shards] == sorted(s.id for s in shards)
    assert all(s.size > 0 and s.version for s in shards)
    records = [r for s in shards for r in iter_shard_records(s)]
    got = {r["image_id"]: r for r in records}
    assert len(got) == len(records) == len(EXPECTED)
    for image_id, (data, error_word) in EXPECTED.items():
        assert got[image_id]["data"] == data
        assert (got[image_id]["error"] is None) == (error_word is None)
        if error_word:
            assert error_word in got[image_id]["error"]
    tar_row = got["shards/part-0000.tar/k1"]
    assert tar_row["shard"] == "shards/part-0000.tar"
    assert tar_row["image_uri"] == source_uri + "/shards/part-0000.tar#k1.jpg"
    assert got["photos/a.jpg"]["image_uri"] == source_uri + "/photos/a.jpg"
    assert got["tables/part-0.parquet/z"]["image_uri"].endswith("part-0.parquet#z")


JPEG_HEAD = b"\xff\xd8\xff\xe0" + bytes(40)
HEIC_HEAD = b"\x00\x00\x00\x18ftypheic" + bytes(40)
AVIF_HEAD = b"\x00\x00\x00\x1cftypavif" + bytes(40)
# Every kind of name a camera roll or a data lake holds: what must be an input, what is skipped.
ODD_TREE = {
    "cam/_DSC0001.JPG": JPEG_HEAD,  # a camera's own name: an input, not a marker
    "_raw/IMG_1.jpg": JPEG_HEAD,  # a folder starting with "_" is entered
    "cam/IMG_0002": JPEG_HEAD,  # no extension: a JPEG by its first bytes
    "cam/IMG_0003.dat": JPEG_HEAD,  # an extension that lies
    "cam/p.jfif": JPEG_HEAD, "cam/q.jpe": JPEG_HEAD,
    "cam/r.heic": HEIC_HEAD, "cam/s.avif": AVIF_HEAD,
    "cam/README": b"just some words here",  # no extension, not an image
    "cam/blob.bin": b"\x00\x01 not an image",
    "cam/notes.txt": JPEG_HEAD,  # a known non-image extension is not opened
    "cam/.DS_Store": b"x",
    ".cache/a.jpg": JPEG_HEAD,
    "cam/_SUCCESS": b"",
    "lake/_temporary/0/part.jpg": JPEG_HEAD,
    "lake/_delta_log/0.json": b"{}",
    "old-run/_panoray_output.json": b"{}",  # an earlier panoray output inside SRC
    "old-run/data/x.parquet": b"PAR1",
    "me/out/data/y.parquet": b"PAR1",  # this job's own DST, passed as exclude
}
ODD_INPUTS = {"cam/_DSC0001.JPG", "_raw/IMG_1.jpg", "cam/IMG_0002", "cam/IMG_0003.dat",
              "cam/p.jfif", "cam/q.jpe", "cam/r.heic", "cam/s.avif"}
ODD_SKIPPED = {
    "hidden": {".cache/", "cam/.DS_Store"},
    "job marker": {"cam/_SUCCESS", "lake/_delta_log/", "lake/_temporary/"},
    "not an image": {"cam/README", "cam/blob.bin", "cam/notes.txt"},
    "panoray output": {"me/out/", "old-run/"},
}


def test_every_file_gets_a_row_or_a_reason(source_uri):
    from pipeline.segment.sources import Skipped

    _write_tree(source_uri, ODD_TREE)
    skipped = Skipped()
    shards = list_shards(source_uri, files_per_shard=4, exclude=f"{source_uri}/me/out",
                         skipped=skipped)
    assert {m for s in shards for m in s.members} == ODD_INPUTS
    assert {reason: set(names) for reason, names in skipped.examples.items()} == ODD_SKIPPED
    assert skipped.counts == {reason: len(names) for reason, names in ODD_SKIPPED.items()}
    line = skipped.render()
    assert line.startswith("10 skipped: ") and "\n" not in line


def test_an_output_is_never_an_input(tmp_path):
    from pipeline.segment.sources import check_output_place

    _write_tree(str(tmp_path / "src"), {"a.jpg": JPEG_HEAD, "out/_panoray_output.json": b"{}"})
    with pytest.raises(ValueError, match="is the input folder itself"):
        check_output_place(str(tmp_path / "src"), str(tmp_path / "src") + "/")
    with pytest.raises(ValueError, match="is a panoray output"):
        check_output_place(str(tmp_path / "src" / "out"), str(tmp_path / "elsewhere"))
    check_output_place(str(tmp_path / "src"), str(tmp_path / "src" / "out"))  # inside: fine
    assert not (tmp_path / "elsewhere").exists()


def test_s3_endpoint_in_the_uri_works_and_stays_out_of_rows(s3_bucket, s3_server, monkeypatch):
    _write_tree(f"s3://{s3_bucket}/src", {"p/a.jpg": b"a"})
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    shards = list_shards(f"s3://{s3_bucket}/src?endpoint={s3_server}")
    (row,) = [r for s in shards for r in iter_shard_records(s)]
    assert row["data"] == b"a"
    assert row["image_uri"] == f"s3://{s3_bucket}/src/p/a.jpg"


def test_files_shards_keep_their_ids_when_files_are_added(tmp_path):
    src = tmp_path / "src"
    names = [f"day-{d:02d}/img-{i:04d}.jpg" for d in range(3) for i in range(100)]
    _write_tree(str(src), {name: b"x" for name in names})
    before = list_shards(str(src), files_per_shard=8)
    assert sorted(m for s in before for m in s.members) == sorted(names)
    assert 10 < len(before) < 100  # about 300 / 8, cut by hash: not one, not one per file
    assert before == list_shards(str(src), files_per_shard=8)  # deterministic
    _write_tree(str(src), {"day-01/img-0050b.jpg": b"new", "day-03/img-0000.jpg": b"new"})
    after = list_shards(str(src), files_per_shard=8)
    gone = {s.id for s in before} - {s.id for s in after}
    assert 1 <= len(gone) <= 2  # only the shards the new files fall into change
    changed = [s for s in after if s.id not in {b.id for b in before}]
    new_members = {m for s in changed for m in s.members} - {m for b in before for m in b.members}
    assert new_members == {"day-01/img-0050b.jpg", "day-03/img-0000.jpg"}
    one_folder = [s for s in after if len({m.rsplit("/", 1)[0] for m in s.members}) == 1]
    assert one_folder  # and a shard within one folder is named after it:
    assert all(s.id.startswith(s.members[0].rsplit("/", 1)[0] + "/files-") for s in one_folder)


def test_a_loose_file_that_vanishes_becomes_an_error_record(tmp_path):
    _write_tree(str(tmp_path), {"a.jpg": b"a", "b.jpg": b"b"})
    (shard,) = list_shards(str(tmp_path), files_per_shard=10**9)
    (tmp_path / "b.jpg").unlink()
    records = {r["image_id"]: r for r in iter_shard_records(shard)}
    assert records["a.jpg"]["data"] == b"a"
    assert records["b.jpg"]["data"] is None and "disappeared" in records["b.jpg"]["error"]


def test_single_file_sources(tmp_path):
    _write_tree(str(tmp_path), {"one.tar": TREE["shards/part-0000.tar"], "x/pic.png": b"p"})
    (tar_shard,) = list_shards(str(tmp_path / "one.tar"))
    assert tar_shard.id == "one.tar" and tar_shard.kind == "tar"
    assert len(list(iter_shard_records(tar_shard))) == 3
    (file_shard,) = list_shards(str(tmp_path / "x" / "pic.png"))
    (row,) = iter_shard_records(file_shard)
    assert (row["image_id"], row["data"]) == ("pic.png", b"p")


GOOD = _tar([(f"k{i}.jpg", bytes([i]) * 3000) for i in range(3)])  # 512 + 3072 bytes per member


@pytest.mark.parametrize(
    ("data", "ok_ids", "error_ids", "word"),
    [
        (GOOD[:4106], ["k0"], ["k1"], "cannot read tar member k1.jpg"),  # cut inside k1's data
        (GOOD[:3684], ["k0"], [""], "cut short"),  # cut inside k1's header: silent in tarfile
        (GOOD[:3594] + b"\xff" * 10 + GOOD[3604:], ["k0"], [""], "not a valid tar header"),
        (b"this is not a tar file at all" * 40, [], [""], "not a readable tar"),
        (GOOD[:3584], ["k0"], [], None),  # ends exactly between members: nothing to tell
    ],
    ids=["cut-in-data", "cut-in-header", "bad-header", "not-a-tar", "cut-at-boundary"],
)
def test_damaged_tar_yields_one_record_per_input_it_can_enumerate(
    tmp_path, data, ok_ids, error_ids, word
):
    _write_tree(str(tmp_path), {"part.tar": data})
    (shard,) = list_shards(str(tmp_path))
    records = list(iter_shard_records(shard))
    key = lambda r: r["image_id"].removeprefix("part.tar").removeprefix("/")  # noqa: E731
    assert [key(r) for r in records if r["error"] is None] == ok_ids
    errors = [r for r in records if r["error"] is not None]
    assert [key(r) for r in errors] == error_ids
    if word:
        assert word in errors[0]["error"]
        assert all(r["data"] is None for r in errors)


def test_tar_keys_seen_twice_get_distinct_ids(tmp_path):
    data = _tar([("a.jpg", b"1"), ("b.jpg", b"2"), ("a.jpg", b"3")])
    _write_tree(str(tmp_path), {"t.tar": data})
    (shard,) = list_shards(str(tmp_path))
    assert [r["image_id"] for r in iter_shard_records(shard)] == ["t.tar/a", "t.tar/b", "t.tar/a#2"]


def test_parquet_hugging_face_image_struct_and_row_number_keys(tmp_path):
    images = pa.array(
        [{"bytes": b"i0", "path": "0.jpg"}, {"bytes": b"i1", "path": None}],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    _write_tree(str(tmp_path), {"hf.parquet": _parquet(pa.table({"img": images}))})
    (shard,) = list_shards(str(tmp_path))
    rows = list(iter_shard_records(shard))
    assert [(r["image_id"], r["data"]) for r in rows] == [("hf.parquet/0", b"i0"),
                                                         ("hf.parquet/1", b"i1")]


def test_parquet_without_an_image_column_fails_at_listing(tmp_path):
    table = pa.table({"a": pa.array([b"1"]), "b": pa.array([b"2"]), "n": [1]})
    _write_tree(str(tmp_path), {"t.parquet": _parquet(table)})
    with pytest.raises(ValueError, match=r"binary columns: \['a', 'b'\].*--image-column"):
        list_shards(str(tmp_path))
    (shard,) = list_shards(str(tmp_path), image_column="b", id_column="n")
    assert [r["image_id"] for r in iter_shard_records(shard)] == ["t.parquet/1"]
    with pytest.raises(ValueError, match="'nope' not found"):
        list_shards(str(tmp_path), image_column="nope")


def test_damaged_parquet_row_group_yields_an_error_per_row(tmp_path):
    table = pa.table({"key": [f"r{i}" for i in range(6)],
                      "image": pa.array([bytes([i]) * 50 for i in range(6)])})
    data = bytearray(_parquet(table, row_group_size=3, compression="none"))
    meta = pq.ParquetFile(io.BytesIO(bytes(data))).metadata
    image_chunk = meta.row_group(1).column(1)
    at = image_chunk.data_page_offset
    data[at : at + 12] = b"\xff" * 12  # the page header of the second group's image column
    _write_tree(str(tmp_path), {"bad.parquet": bytes(data), "junk.parquet": b"no footer"})
    shards = list_shards(str(tmp_path))
    rows = {r["image_id"]: r for s in shards for r in iter_shard_records(s)}
    readable = [rows[f"bad.parquet/r{i}"]["error"] is None for i in range(6)]
    assert readable == [True] * 3 + [False] * 3
    assert "row group 1" in rows["bad.parquet/r4"]["error"]
    assert "cannot read Parquet file" in rows["junk.parquet"]["error"]
    assert len(rows) == 7


def test_shard_survives_a_trip_through_a_plain_dict(tmp_path):
    _write_tree(str(tmp_path), {"a/x.jpg": b"x", "a/y.jpg": b"y"})
    (shard,) = list_shards(str(tmp_path))
    assert Shard.from_dict(shard.to_dict()) == shard


def test_clear_errors_for_bad_sources(tmp_path, s3_bucket):
    with pytest.raises(FileNotFoundError, match="nothing found"):
        list_shards(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="nothing found"):
        list_shards(f"s3://{s3_bucket}-absent/x")
    _write_tree(str(tmp_path), {"a.txt": b"x"})
    with pytest.raises(ValueError, match="no images found"):
        list_shards(str(tmp_path))
    with pytest.raises(ValueError, match="unsupported URI scheme 'nosuch'"):
        list_shards("nosuch://bucket/x")


def test_missing_credentials_say_so(s3_bucket, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(PermissionError, match="no credentials"):
        list_shards(f"s3://{s3_bucket}/src")
