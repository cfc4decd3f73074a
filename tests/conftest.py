"""Shared fixtures: real servers on loopback, started and stopped by the tests themselves."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

SAMPLE_DIR = Path(__file__).resolve().parent / "data" / "coco-panoptic-sample"


@pytest.fixture(autouse=True)
def _no_log_handler_on_a_closed_capture():
    """A library that set up its log handler while pytest was capturing (Ray does, on import)
    keeps writing to that capture file after pytest has closed it; from a thread that outlives
    its test (Ray Data's progress reporter) every record then prints "--- Logging error ---"
    and a traceback into whatever test runs next. Point such handlers at the real stderr."""
    import logging
    import sys

    yield
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and getattr(stream, "closed", False):
                with handler.lock:  # not setStream: it would flush the closed file
                    handler.stream = sys.__stderr__


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def coco_sample() -> Path:
    """The two real COCO val2017 images with their panoptic ground truth."""
    if not SAMPLE_DIR.is_dir():
        pytest.fail(f"COCO sample data not found at {SAMPLE_DIR}; it ships with the repo "
                    "(tests/data)")
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1, with credentials and endpoint exported to the environment.

    Yields the endpoint URL. Ray workers started after this fixture inherit the environment.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ENDPOINT_URL_S3": endpoint,
        }
    )
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_S3_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the moto server; yields its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A single-node local Ray instance on loopback, shared by the tests that need one.

    It starts after the S3 server so that its workers inherit the S3 endpoint and credentials.
    """
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh instance, never a cluster some test left running
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()
