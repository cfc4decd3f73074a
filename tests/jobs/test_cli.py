"""User mistakes end with one clear sentence on stderr and exit status 2, no traceback."""

from __future__ import annotations

import os

import pytest

from jobs.cli import main

COMMANDS = ("segment", "finetune", "evaluate", "show", "export", "synth", "convert", "submit",
            "demo")


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
