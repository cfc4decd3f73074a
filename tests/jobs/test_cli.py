"""User mistakes end with one clear sentence on stderr and exit status 2, no traceback."""

from __future__ import annotations

import os

import pytest

from jobs.cli import main

COMMANDS = ("segment", "finetune", "evaluate", "show", "export", "report", "synth", "convert",
            "submit", "logs", "demo")


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _assert_one_sentence(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("panoray")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: panoray {command}" in capsys.readouterr().out


def test_missing_bundle(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"x")
    code, _, err = _run(capsys, "segment", str(tmp_path / "in"), str(tmp_path / "out"),
                        "--model", str(tmp_path / "no-such-bundle"))
    _assert_one_sentence(code, err, "not a model bundle")


def test_bad_input_uri(tmp_path, capsys):
    code, _, err = _run(capsys, "segment", str(tmp_path / "nowhere"), str(tmp_path / "out"),
                        "--model", "m")
    _assert_one_sentence(code, err, "nowhere")


def test_unknown_preset(tmp_path, capsys):
    code, _, err = _run(capsys, "convert", "--from", "detectron2", str(tmp_path / "x.pkl"),
                        str(tmp_path / "b"), "--preset", "r51-coco-panoptic")
    _assert_one_sentence(code, err, "r51-coco-panoptic", "choose one of")
    code, _, err = _run(capsys, "finetune", "--train", str(tmp_path), "--storage",
                        str(tmp_path), "--model", "tinyy")
    _assert_one_sentence(code, err, "tinyy")


def test_missing_arguments_are_named(capsys):
    code, _, err = _run(capsys, "segment", "a", "b")
    _assert_one_sentence(code, err, "--model")


@pytest.mark.parametrize("command", ["segment", "synth"])
def test_no_credentials(tmp_path, capsys, monkeypatch, command):
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    if command == "segment":
        args = ["segment", "s3://panoray-test-bucket/in", str(tmp_path / "out"), "--model", "m"]
    else:
        args = ["synth", "s3://panoray-test-bucket/synth", "--train", "1", "--val", "1"]
    code, _, err = _run(capsys, *args)
    _assert_one_sentence(code, err, "credentials")


QUIET_STDERR = r"""
import os, sys, logging
from jobs.cli import _quiet_stderr, configure_logging
configure_logging(False)
os.write(2, b"before\n")
with _quiet_stderr():
    os.write(2, b"[2026-01-01 00:00:00,000 E 1 1] core_worker.cc:1: Actor with class name: 'X' "
                b"has constructor arguments in the object store and max_restarts > 0.\n")
    os.write(2, b"\rbar 1/2")  # a progress bar's redraw: passes at once, no line end needed
    os.write(2, b"\rbar 2/2\n(Worker pid=1) Progress bars disabled. To enable, set x\n")
    print("a line from python", file=sys.stderr)
    logging.getLogger("ray._private.authentication.authentication_token_setup").warning(
        "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled")
    logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled. To ...")
    logging.getLogger("ray.data._internal.progress").warning("something else")
    os.write(2, b"unfinished")
print("after", file=sys.stderr)
"""


def test_ray_noise_is_left_out_of_stderr_and_the_rest_passes_in_order():
    import subprocess
    import sys
    from pathlib import Path

    run = subprocess.run([sys.executable, "-c", QUIET_STDERR], capture_output=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr
    lines = run.stderr.decode().split("\n")  # bytes: "\r" stays "\r"
    assert lines[:4] == ["before", "\rbar 1/2\rbar 2/2", "a line from python",
                         lines[3]] and lines[3].endswith("WARNING ray.data._internal.progress: "
                                                         "something else")
    assert lines[4:] == ["unfinishedafter", ""]
