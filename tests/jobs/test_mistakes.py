"""Every mistake a user can make on the command line ends in one sentence on stderr, exit status
2 and no traceback, within seconds, and before anything is created: no Ray started, no model
loaded, no output folder left behind.

The TABLE runs in-process (`jobs.cli.main`); a few rows (SUBPROCESS) also run as
`python -m jobs.cli ...`, which proves the path end to end (no traceback printed by the
interpreter, the exit status the shell sees).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.demo import SHIPPED_MODEL

REPO = Path(__file__).resolve().parents[2]
IN_PROCESS_S = 10.0  # a row's own time in this process (imports are warmed up first)
SUBPROCESS_S = 60.0  # a fresh interpreter on a busy machine
FAKE_KEY_ID = "AKIAPANORAYFAKE98765"
FAKE_SECRET = "panoray-fake-secret-Zq8w3Kx1"


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fake_dashboard() -> Iterator[str]:
    """A Ray dashboard's Jobs API on loopback that knows no job (what `panoray logs` of a
    wrong id meets); yields its URL."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Dashboard(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/api/version":
                status, body = 200, json.dumps({"version": "4", "ray_version": "2.60.0",
                                                "ray_commit": "0"})
            else:
                status, body = 404, f"Job {self.path.rsplit('/', 1)[-1]} does not exist"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Dashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def world(tmp_path_factory, fake_dashboard) -> dict[str, str]:
    """The files the mistakes are made with; {name: path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    w = tmp_path_factory.mktemp("mistakes")
    (w / "in").mkdir()
    (w / "in" / "a.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (w / "empty").mkdir()
    (w / "afile.txt").write_text("a file, not a folder\n")
    (w / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 jpeg bytes")
    (w / "junk.pkl").write_bytes(b"junk that is not a pickle")
    (w / "empty.pkl").write_bytes(b"")
    (w / "specdir").mkdir()
    (w / "pq").mkdir()
    pq.write_table(pa.table({"img": [b"\x89PNG"], "name": ["a"]}), w / "pq" / "a.parquet")
    (w / "bad.yaml").write_text("kind: segment\nsrc: a\n dst: [\n")
    (w / "ft.yaml").write_text("kind: finetune\ntrain: t\nstorage: s\n")
    (w / "typo.yaml").write_text("kind: segment\nsrc: a\ndst: b\nmodel: m\nbach_size: 4\n")
    (w / "secret.yaml").write_text("kind: segment\nsrc: a\ndst: b\nmodel: m\nruntime_env:\n"
                                   "  env_vars: {aws_secret_access_key: x}\n")
    (w / "dtype.yaml").write_text("kind: finetune\ntrain: t\nstorage: s\nbundle_dtype: int8\n")
    (w / "ok.yaml").write_text("kind: segment\nsrc: s3://a/in\ndst: s3://a/out\nmodel: m\n")
    (w / "rel.yaml").write_text("kind: segment\nsrc: photos/in\ndst: s3://a/out\nmodel: m\n")
    (w / "abs.yaml").write_text(f"kind: finetune\ntrain: s3://a/t\nstorage: {w}/runs\n")
    doc = {"images": [], "annotations": [], "categories": []}
    for split in ("train", "gt"):
        (w / split / "images").mkdir(parents=True)
        (w / split / "panoptic").mkdir()
        (w / split / "panoptic.json").write_text(json.dumps(doc))
    (w / "nopngs.json").write_text(json.dumps(doc))
    (w / "segout" / "data").mkdir(parents=True)
    paths = {p.name.replace(".", "_"): str(p) for p in w.iterdir()}
    return {**paths, "w": str(w), "bundle": str(SHIPPED_MODEL), "port": str(_closed_port()),
            "dashboard": fake_dashboard}


@pytest.fixture(scope="module", autouse=True)
def warm_imports():
    """What a command imports once per process (torch, the bundle reader, the stages), so that a
    row's time is the time of its checks."""
    import ray.job_submission  # noqa: F401

    import model.bundle  # noqa: F401
    import pipeline.segment.predictor  # noqa: F401
    import pipeline.segment.sources  # noqa: F401
    import pipeline.train.data  # noqa: F401


# (id, command line, words the message must contain, paths that must not exist afterwards);
# {name} is a path of `world`. Output paths that a refused run must not create: {w}/out...
TABLE = [
    # segment: URIs
    ("segment-src-scheme", "segment foo://x {w}/out --model {bundle}", ["foo://x"], ["out"]),
    ("segment-dst-scheme", "segment {in} foo://y --model {bundle}", ["foo://y"], []),
    ("segment-model-scheme", "segment {in} {w}/out --model foo://z", ["foo://z"], ["out"]),
    ("segment-model-a-file", "segment {in} {w}/out --model {afile_txt}", ["afile.txt"], ["out"]),
    ("segment-model-missing", "segment {in} {w}/out --model {w}/nobundle", ["nobundle"],
     ["out"]),
    ("segment-src-missing", "segment {w}/nowhere {w}/out --model {bundle}", ["nowhere"],
     ["out"]),
    ("segment-src-empty", "segment {empty} {w}/out --model {bundle}", ["empty", "no images"],
     ["out"]),
    ("segment-dst-a-file", "segment {in} {afile_txt} --model {bundle}", ["afile.txt"], []),
    ("segment-dst-below-a-file", "segment {in} {afile_txt}/sub --model {bundle}",
     ["afile.txt"], []),
    ("segment-image-column", "segment {pq} {w}/out --model {bundle} --image-column nope",
     ["'nope'"], ["out"]),
    ("segment-address-closed", "segment {in} {w}/out --model {bundle} --address "
     "127.0.0.1:{port}", ["127.0.0.1:{port}"], ["out"]),
    ("segment-predictor-missing", "segment {in} {w}/out --model m --predictor nosuchpkg.x:Seg",
     ["nosuchpkg"], ["out"]),
    ("segment-predictor-malformed", "segment {in} {w}/out --model m --predictor justaname",
     ["justaname"], ["out"]),
    # segment: parameters
    ("segment-num-actors-0", "segment {in} {w}/out --model {bundle} --num-actors 0",
     ["num_actors", "got 0"], ["out"]),
    ("segment-num-actors-negative", "segment {in} {w}/out --model {bundle} --num-actors -1",
     ["num_actors", "-1"], ["out"]),
    ("segment-batch-size-word", "segment {in} {w}/out --model {bundle} --batch-size four",
     ["--batch-size", "four"], ["out"]),
    ("segment-no-model", "segment {in} {w}/out", ["--model"], ["out"]),
    # --spec
    ("spec-a-folder", "segment --spec {specdir}", ["specdir", "folder"], []),
    ("spec-missing", "segment --spec {w}/none.yaml", ["none.yaml"], []),
    ("spec-bad-yaml", "segment --spec {bad_yaml}", ["bad.yaml:3:5:", "not valid YAML"], []),
    ("spec-wrong-kind", "segment --spec {ft_yaml}", ["ft.yaml", "finetune spec"], []),
    ("spec-unknown-key", "segment --spec {typo_yaml}", ["'bach_size'"], []),
    ("spec-credential", "segment --spec {secret_yaml}", ["aws_secret_access_key"], []),
    ("spec-bad-choice", "finetune --spec {dtype_yaml}", ["dtype.yaml", "'int8'"], []),
    # finetune
    ("finetune-crop-size-0", "finetune --train {train} --storage {w}/st --crop-size 0",
     ["crop_size", "got 0"], ["st"]),
    ("finetune-crop-size-16", "finetune --train {train} --storage {w}/st --crop-size 16",
     ["crop_size", "16"], ["st"]),
    ("finetune-min-scale-0", "finetune --train {train} --storage {w}/st --min-scale 0",
     ["min_scale", "0.0"], ["st"]),
    ("finetune-scales-crossed", "finetune --train {train} --storage {w}/st --min-scale 3 "
     "--max-scale 2", ["3.0", "2.0"], ["st"]),
    ("finetune-max-failures", "finetune --train {train} --storage {w}/st --max-failures -2",
     ["max_failures", "-2"], ["st"]),
    ("finetune-preset", "finetune --train {train} --storage {w}/st --model tinyy", ["tinyy"],
     ["st"]),
    ("finetune-model-a-file", "finetune --train {train} --storage {w}/st --model {afile_txt}",
     ["afile.txt"], ["st"]),
    ("finetune-train-missing", "finetune --train {w}/notrain --storage {w}/st", ["notrain"],
     ["st"]),
    ("finetune-train-scheme", "finetune --train foo://t --storage {w}/st", ["foo://t"], ["st"]),
    ("finetune-val-missing", "finetune --train {train} --val {w}/noval --storage {w}/st",
     ["noval"], ["st"]),
    ("finetune-storage-a-file", "finetune --train {train} --storage {afile_txt}",
     ["afile.txt"], []),
    ("finetune-address-closed", "finetune --train {train} --storage {w}/st --address "
     "127.0.0.1:{port}", ["127.0.0.1:{port}"], ["st"]),
    ("finetune-bundle-dtype", "finetune --train {train} --storage {w}/st --bundle-dtype int8",
     ["int8"], ["st"]),
    # evaluate
    ("evaluate-gt-a-jpg", "evaluate {segout} {photo_jpg}", ["photo.jpg", "not JSON"], []),
    ("evaluate-gt-missing", "evaluate {segout} {w}/missing.json", ["missing.json"], []),
    ("evaluate-gt-no-pngs", "evaluate {segout} {nopngs_json}", ["nopngs"], []),
    ("evaluate-no-output", "evaluate {w}/noout {gt}/panoptic.json", ["noout"], []),
    ("evaluate-out-missing-folder", "evaluate {segout} {gt}/panoptic.json --out "
     "{w}/nodir/pq.json", ["nodir"], ["nodir"]),
    ("evaluate-out-a-folder", "evaluate {segout} {gt}/panoptic.json --out {specdir}",
     ["specdir"], []),
    # show
    ("show-limit-negative", "show {segout} {w}/ov --limit -3", ["--limit", "-3"], ["ov"]),
    ("show-limit-0", "show {segout} {w}/ov --limit 0", ["--limit", "got 0"], ["ov"]),
    ("show-no-output", "show {w}/noout {w}/ov", ["noout"], ["ov"]),
    ("show-dst-a-file", "show {segout} {afile_txt}", ["afile.txt"], []),
    ("show-model-scheme", "show {segout} {w}/ov --model foo://m", ["foo://m"], ["ov"]),
    ("show-categories-not-json", "show {segout} {w}/ov --categories {photo_jpg}",
     ["photo.jpg"], ["ov"]),
    # export
    ("export-no-output", "export {w}/noout {w}/ex --model {bundle}", ["noout", "panoray segment"],
     ["ex"]),
    ("export-no-label-space", "export {segout} {w}/ex", ["--model", "--categories"], ["ex"]),
    ("export-both-label-spaces", "export {segout} {w}/ex --model {bundle} --categories "
     "{gt}/panoptic.json", ["not both"], ["ex"]),
    ("export-format", "export {segout} {w}/ex --model {bundle} --format yolo", ["yolo"], ["ex"]),
    ("export-dst-a-file", "export {segout} {afile_txt} --model {bundle}", ["afile.txt"], []),
    ("export-dst-is-output", "export {segout} {segout} --model {bundle}",
     ["segment output itself"], []),
    ("export-dst-scheme", "export {segout} foo://r --model {bundle}", ["foo://r"], []),
    ("export-model-missing", "export {segout} {w}/ex --model {w}/nobundle", ["nobundle"],
     ["ex"]),
    ("export-categories-not-json", "export {segout} {w}/ex --categories {photo_jpg}",
     ["photo.jpg"], ["ex"]),
    # report
    ("report-no-output", "report {w}/noout {w}/rep", ["noout", "panoray segment"], ["rep"]),
    ("report-dst-a-file", "report {segout} {afile_txt}", ["afile.txt"], []),
    ("report-dst-below-a-file", "report {segout} {afile_txt}/sub", ["afile.txt"], []),
    ("report-dst-scheme", "report {segout} foo://r", ["foo://r"], []),
    ("report-dst-is-output", "report {segout} {segout}", ["segment output itself"], []),
    ("report-both-label-spaces", "report {segout} {w}/rep --model {bundle} --categories "
     "{gt}/panoptic.json", ["--model", "--categories", "not both"], ["rep"]),
    ("report-model-missing", "report {segout} {w}/rep --model {w}/nobundle", ["nobundle"],
     ["rep"]),
    ("report-model-a-file", "report {segout} {w}/rep --model {afile_txt}", ["afile.txt"],
     ["rep"]),
    ("report-categories-not-json", "report {segout} {w}/rep --categories {photo_jpg}",
     ["photo.jpg", "not JSON"], ["rep"]),
    ("report-categories-empty", "report {segout} {w}/rep --categories {nopngs_json}",
     ["nopngs.json", "no categories"], ["rep"]),
    ("report-gt-missing", "report {segout} {w}/rep --gt {w}/missing.json", ["--gt",
     "missing.json"], ["rep"]),
    ("report-gt-a-jpg", "report {segout} {w}/rep --gt {photo_jpg}", ["photo.jpg", "not JSON"],
     ["rep"]),
    ("report-gt-no-pngs", "report {segout} {w}/rep --gt {nopngs_json}", ["nopngs"], ["rep"]),
    ("report-gt-folder-alone", "report {segout} {w}/rep --gt-folder {gt}/panoptic",
     ["--gt-folder", "--gt GT_JSON"], ["rep"]),
    ("report-limit-negative", "report {segout} {w}/rep --limit -1", ["--limit", "-1"], ["rep"]),
    ("report-empty-output", "report {segout} {w}/rep", ["no segment output", "segout"],
     ["rep"]),
    # convert
    ("convert-junk-pkl", "convert --from detectron2 {junk_pkl} {w}/b --preset tiny",
     ["junk.pkl", "not a detectron2"], ["b"]),
    ("convert-empty-pkl", "convert --from detectron2 {empty_pkl} {w}/b --preset tiny",
     ["empty.pkl"], ["b"]),
    ("convert-missing-pkl", "convert --from detectron2 {w}/none.pkl {w}/b --preset tiny",
     ["none.pkl"], ["b"]),
    ("convert-pkl-a-folder", "convert --from detectron2 {specdir} {w}/b --preset tiny",
     ["specdir"], ["b"]),
    ("convert-no-preset", "convert --from detectron2 {junk_pkl} {w}/b", ["--preset"], ["b"]),
    ("convert-bad-preset", "convert --from detectron2 {junk_pkl} {w}/b --preset r51",
     ["r51"], ["b"]),
    ("convert-hf-a-file", "convert --from hf {afile_txt} {w}/b", ["afile.txt"], ["b"]),
    ("convert-dst-a-file", "convert --from hf {specdir} {afile_txt}", ["afile.txt"], []),
    ("convert-bad-format", "convert --from onnx {junk_pkl} {w}/b", ["onnx"], ["b"]),
    # synth
    ("synth-train-negative", "synth {w}/syn --train -1", ["--train", "-1"], ["syn"]),
    ("synth-size-too-small", "synth {w}/syn --size 32", ["--size", "32"], ["syn"]),
    ("synth-dst-a-file", "synth {afile_txt}", ["afile.txt"], []),
    ("synth-dst-scheme", "synth foo://s", ["foo://s"], []),
    # demo
    ("demo-out-a-file", "demo --out {afile_txt}", ["afile.txt"], []),
    ("demo-train-steps-0", "demo --out {w}/demo --train-steps 0", ["--train-steps", "got 0"],
     ["demo"]),
    # submit
    ("submit-address-without-http", "submit {ok_yaml} --address 127.0.0.1:{port}",
     ["127.0.0.1:{port}", "http://"], []),
    ("submit-address-closed", "submit {ok_yaml} --address http://127.0.0.1:{port}",
     ["127.0.0.1:{port}"], []),
    ("submit-address-scheme", "submit {ok_yaml} --address ftp://127.0.0.1:{port}",
     ["ftp://127.0.0.1:{port}"], []),
    ("submit-spec-a-folder", "submit {specdir} --address http://127.0.0.1:{port}",
     ["specdir"], []),
    ("submit-spec-bad-yaml", "submit {bad_yaml} --address http://127.0.0.1:{port}",
     ["bad.yaml:3:5:"], []),
    # a local path for a remote cluster: refused before the address is even tried
    ("submit-relative-path-remote", "submit {rel_yaml} --address http://head.invalid:8265",
     ["src 'photos/in'", "relative path", "s3://", "--paths-on-cluster"], []),
    ("submit-local-path-remote", "submit {abs_yaml} --address http://head.invalid:8265",
     ["storage '{w}/runs'", "path on this machine", "--paths-on-cluster"], ["runs"]),
    # logs
    ("logs-unknown-job", "logs raysubmit_nosuchjob --address {dashboard}",
     ["has no job 'raysubmit_nosuchjob'", "{dashboard}"], []),
    ("logs-not-a-job-id", "logs raysubmit/../x --address {dashboard}",
     ["'raysubmit/../x'", "not a job id"], []),
    ("logs-address-closed", "logs raysubmit_x --address http://127.0.0.1:{port}",
     ["127.0.0.1:{port}"], []),
]
SUBPROCESS = ["segment-src-scheme", "spec-a-folder", "synth-train-negative",
              "submit-address-without-http", "submit-relative-path-remote"]


def _argv(line: str, world: dict[str, str]) -> list[str]:
    return [part.format(**world) for part in line.split()]


def _error_line(err: str, words: list[str], world: dict[str, str]) -> str:
    """The one `panoray ...: error:` line of stderr, checked."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("panoray")]
    assert len(lines) == 1, err
    line = lines[0]
    assert ": error: " in line, line
    for word in words:
        assert word.format(**world) in line, line
    return line


def _run_in_process(argv: list[str], capsys) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own mistakes
        code = e.code
    took = time.monotonic() - start
    return code, capsys.readouterr().err, took


@pytest.mark.parametrize("row", TABLE, ids=[row[0] for row in TABLE])
def test_a_mistake_is_one_sentence(row, world, capsys, monkeypatch):
    name, line, words, not_created = row
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # submit's and logs' token discovery may set RAY_AUTH_MODE: as it was again after the row
    monkeypatch.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", ""))
    if not os.environ["RAY_AUTH_MODE"]:
        monkeypatch.delenv("RAY_AUTH_MODE")
    code, err, took = _run_in_process(_argv(line, world), capsys)
    assert code == 2, err
    _error_line(err, words, world)
    assert err.strip().count("\n") == 0, err  # nothing else on stderr either
    assert took < IN_PROCESS_S, f"{name} took {took:.1f} s"
    for path in not_created:
        assert not os.path.exists(os.path.join(world["w"], path)), f"{name} created {path}"


def test_the_table_is_long_and_covers_every_command():
    assert len(TABLE) >= 30
    commands = {line.split()[0] for _, line, _, _ in TABLE}
    assert commands == {"segment", "finetune", "evaluate", "show", "report", "export", "convert",
                        "synth", "demo", "submit", "logs"}
    assert set(SUBPROCESS) <= {row[0] for row in TABLE}


def test_every_validator_named_in_the_cli_exists():
    """jobs.cli maps the ValueErrors raised in these functions to one sentence: a renamed one
    would silently turn its mistakes back into tracebacks."""
    import functools
    import importlib

    from jobs.cli import _VALIDATORS

    for module_name, names in _VALIDATORS.items():
        module = importlib.import_module(module_name)
        for name in names:
            fn = functools.reduce(getattr, name.split("."), module)
            assert fn.__code__.co_qualname == name, (module_name, name)


def test_a_value_error_elsewhere_keeps_its_traceback(world, monkeypatch):
    """Only the validators' ValueErrors are user errors: one from anywhere else is a bug."""
    import pipeline.segment.job

    def broken(**kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(pipeline.segment.job, "run_segment", broken)
    with pytest.raises(ValueError, match="broadcast"):
        main(["segment", world["in"], f"{world['w']}/bugout", "--model", world["bundle"]])
    assert not os.path.exists(f"{world['w']}/bugout")


def test_an_unreachable_object_store_is_one_sentence(world, capsys, monkeypatch):
    endpoint = f"http://127.0.0.1:{world['port']}"
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(key, endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    code, err, took = _run_in_process(
        ["segment", "s3://some-bucket/in", f"{world['w']}/s3out", "--model", world["bundle"]],
        capsys)
    assert code == 2, err
    _error_line(err, ["cannot reach", world["port"]], world)
    assert took < 30, took
    assert not os.path.exists(f"{world['w']}/s3out")


def _subprocess(argv: list[str], env: dict[str, str] | None = None):
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=SUBPROCESS_S * 2)
    return out, time.monotonic() - start


@pytest.mark.parametrize("name", SUBPROCESS)
def test_end_to_end_a_mistake_is_one_sentence_and_no_traceback(name, world):
    _, line, words, not_created = next(row for row in TABLE if row[0] == name)
    out, took = _subprocess(_argv(line, world))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    _error_line(out.stderr, words, world)
    assert out.stderr.strip().splitlines()[-1].startswith("panoray"), out.stderr
    assert took < SUBPROCESS_S, f"{name} took {took:.1f} s"
    for path in not_created:
        assert not os.path.exists(os.path.join(world["w"], path))


@pytest.mark.parametrize("store", ["closed-port", "moto"])
def test_verbose_logging_never_prints_credentials(store, world, request):
    """-v is DEBUG for panoray's loggers only: botocore at DEBUG would print each request's
    Authorization header, with the access key id in it. A closed port fails before any request;
    the moto server answers a signed request (no such bucket), so botocore runs for real."""
    if store == "moto":
        endpoint, words = request.getfixturevalue("s3_server"), ["nothing found", "some-bucket"]
    else:
        endpoint, words = f"http://127.0.0.1:{world['port']}", ["cannot reach", "some-bucket"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(AWS_ACCESS_KEY_ID=FAKE_KEY_ID, AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
               AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint,
               AWS_ENDPOINT_URL_S3=endpoint, AWS_MAX_ATTEMPTS="1",
               AWS_EC2_METADATA_DISABLED="true")
    out, took = _subprocess(["-v", "segment", "s3://some-bucket/in", f"{world['w']}/vout",
                             "--model", world["bundle"]], env)
    text = out.stdout + out.stderr
    assert FAKE_KEY_ID not in text and FAKE_SECRET not in text, text
    for library in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "asyncio"):
        assert f"DEBUG {library}" not in text, text
    assert out.returncode == 2, text
    assert "Traceback" not in text
    _error_line(out.stderr, words, world)
    assert took < SUBPROCESS_S, took


def test_verbose_sets_debug_on_panoray_loggers_only():
    import logging

    from jobs.cli import OWN_LOGGERS, configure_logging

    try:
        configure_logging(True)
        assert all(logging.getLogger(n).getEffectiveLevel() == logging.DEBUG
                   for n in OWN_LOGGERS)
        for library in ("botocore", "s3fs", "urllib3", "fsspec", "ray"):
            assert logging.getLogger(library).getEffectiveLevel() > logging.DEBUG, library
    finally:
        configure_logging(False)
    assert logging.getLogger("pipeline").level == logging.NOTSET


def test_finetune_ctrl_c_is_interrupted_and_130(world, capsys, monkeypatch):
    """Ray Train's fit() installs its own SIGINT handler, which aborts the run and then exits
    (SystemExit 0): the command still says "interrupted" and exits 130, like segment."""
    import pipeline.train.job

    def fit_like_ray_train(**kwargs):
        def on_sigint(signum, frame):
            sys.exit(0)

        signal.signal(signal.SIGINT, on_sigint)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the signal arrives before this ends
        raise AssertionError("no SIGINT")

    monkeypatch.setattr(pipeline.train.job, "run_finetune", fit_like_ray_train)
    before = signal.getsignal(signal.SIGINT)
    code = main(["finetune", "--train", world["train"], "--storage", f"{world['w']}/ctrlc"])
    assert code == 130
    assert capsys.readouterr().err.strip() == "panoray: interrupted"
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("where", ["local", "s3"])
def test_too_big_a_pool_for_the_cluster_is_one_sentence(where, world, capsys, monkeypatch,
                                                        request):
    """The pool's size is checked against the cluster's resources, which only a running Ray
    knows (here a stand-in for one: 2 CPUs, no GPU), after the job has taken DST's lock: one
    sentence still, and the output the job created is removed again."""
    import ray

    from model.storage import get_filesystem

    if where == "s3":
        dst = f"s3://{request.getfixturevalue('s3_bucket')}/out"
    else:
        dst = f"{world['w']}/rayout"
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    segment = ["segment", world["in"], dst, "--model", world["bundle"]]
    for argv, words in [(segment + ["--num-actors", "5"], ["5 predictor actors", "at most"]),
                        (segment + ["--gpus-per-actor", "1"], ["1 GPU", "--gpus-per-actor 0"])]:
        code, err, took = _run_in_process(argv, capsys)
        assert code == 2, err
        _error_line(err, words, world)
        fs, path = get_filesystem(dst)
        assert not fs.exists(path) or fs.find(path) == [], fs.find(path)
