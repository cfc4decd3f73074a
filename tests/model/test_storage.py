"""The storage door reuses an S3 filesystem while nothing it was made from changes, and never
serves a stale listing or stale credentials from it."""

from __future__ import annotations

import multiprocessing

from model.storage import get_filesystem


def test_an_s3_filesystem_is_reused_until_its_endpoint_or_aws_environment_changes(
        s3_server, s3_bucket, monkeypatch):
    fs, path = get_filesystem(f"s3://{s3_bucket}/a/b.tar")
    assert path == f"{s3_bucket}/a/b.tar"
    again, other = get_filesystem(f"s3://{s3_bucket}/c")
    assert again is fs and other == f"{s3_bucket}/c"
    # another endpoint, given on the URI: another filesystem
    elsewhere, _ = get_filesystem(f"s3://{s3_bucket}/c?endpoint=http://127.0.0.1:9")
    assert elsewhere is not fs
    # changed credentials in the environment (botocore reads them when a filesystem is
    # made): a fresh filesystem; the same environment again: the first one
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-secret")
    fresh, _ = get_filesystem(f"s3://{s3_bucket}/c")
    assert fresh is not fs
    fresh.pipe_file(f"{s3_bucket}/c/x.bin", b"x")
    monkeypatch.undo()
    back, _ = get_filesystem(f"s3://{s3_bucket}/c")
    assert back is fs and back.cat_file(f"{s3_bucket}/c/x.bin") == b"x"


def test_a_reused_s3_filesystem_lists_what_another_client_just_wrote(s3_server, s3_bucket):
    import boto3

    fs, path = get_filesystem(f"s3://{s3_bucket}/data")
    assert fs.find(path) == []
    client = boto3.client("s3", endpoint_url=s3_server)
    client.put_object(Bucket=s3_bucket, Key="data/one.parquet", Body=b"1")
    again, _ = get_filesystem(f"s3://{s3_bucket}/data")
    assert again is fs
    assert again.find(path) == [f"{path}/one.parquet"]
    client.delete_object(Bucket=s3_bucket, Key="data/one.parquet")
    assert again.find(path) == []


def _identity_in_child(uri: str, parent_id: int, out) -> None:
    fs, _ = get_filesystem(uri)
    out.put((id(fs) != parent_id, fs.exists(uri)))


def test_a_forked_process_makes_its_own_s3_filesystem(s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/forked"
    fs, path = get_filesystem(uri)
    fs.pipe_file(path, b"x")
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_identity_in_child, args=(uri, id(fs), out))
    child.start()
    fresh, exists = out.get(timeout=60)
    child.join(timeout=60)
    assert exists  # the child's own filesystem works
    # the parent's object is copied into the child by fork; the child must not reuse it
    # (its event loop thread and connections stay behind in the parent)
    assert fresh
