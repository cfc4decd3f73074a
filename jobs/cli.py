"""The `panoray` command line. Each command is a thin shell over a function in pipeline/ or
jobs/; errors a user can make end with one sentence on stderr and exit status 2.

How a mistake becomes one sentence: each command first checks what it was given (`check_*`
below: URI schemes, inputs that must exist, outputs that must not be files, a Ray address that
must answer) before it creates anything, starts Ray or loads a model, raising `UserError`. Then
`main` maps a few exception types that only ever describe the user's input (`_USER_ERRORS`) and
the ValueErrors raised by the project's own validators (`_VALIDATORS`: functions that check
parameters and inputs, e.g. the predictor pool's size against the cluster) to
`panoray CMD: error: <one line>` and exit status 2. Everything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

log = logging.getLogger("panoray")

# The project's own loggers: `-v` sets these to DEBUG and nothing else (a library at DEBUG can
# log secrets: botocore logs each request's Authorization header, access key id included).
OWN_LOGGERS = ("panoray", "jobs", "pipeline", "model", "bench")
PROBE_TIMEOUT_S = 3.0  # a Ray or dashboard address must accept a TCP connection this fast


class UserError(Exception):
    """An error the user can fix; printed as one sentence, no traceback."""


# (module, class) of exceptions that describe a user's mistake rather than a bug, looked up only
# in modules already imported (an exception of a module never imported cannot be raised), so
# that an early error costs no import of torch or Ray.
_USER_ERRORS = (
    ("jobs.spec", "SpecError"),
    ("pipeline.segment.commits", "OutputLocked"),
    ("model.bundle", "BundleError"),  # bad format, config or weights (mismatch too)
    ("pipeline.segment.rows", "PredictorError"),
    ("model.convert_detectron2", "UnsafeCheckpointError"),
    ("botocore.exceptions", "NoCredentialsError"),
    ("botocore.exceptions", "PartialCredentialsError"),
)

# Functions (module -> qualified names) whose own ValueErrors are checks of the user's
# parameters or inputs, each one sentence naming the value: such a ValueError raised directly
# in one of them (the innermost frame of its traceback) is a user error. A ValueError from
# anywhere else (numpy, a library, a Ray task) is not, and keeps its traceback.
_VALIDATORS = {
    "pipeline.params": {"check_params"},
    "pipeline.segment.sources": {"list_shards", "check_output_place", "_refuse_an_output",
                                 "_single_file_shard"},
    "pipeline.segment.parquet": {"image_column", "id_column"},
    "pipeline.segment.job": {"plan_resources"},
    "pipeline.train.data": {"LSJConfig.__post_init__", "load_split"},
    "pipeline.train.job": {"_default_cpus_per_worker"},
    "pipeline.coco.synth": {"make_synthetic_dataset"},
    "pipeline.coco.categories": {"read_categories", "parse_categories"},
    "pipeline.segment.export": {"load_label_space", "scan_output", "export_output"},
    "model.convert_detectron2": {"read_detectron2_pickle"},
    "model.convert_hf": {"convert_hf", "config_from_hf", "_categories", "_backbone_config",
                         "convert_hf_state_dict"},
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that describe a user's mistake rather than a bug."""
    errors: list[type[BaseException]] = [UserError, FileNotFoundError, PermissionError]
    for module_name, name in _USER_ERRORS:
        module = sys.modules.get(module_name)
        cls = getattr(module, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            errors.append(cls)
    return tuple(errors)


def _raised_by_validator(error: BaseException) -> bool:
    """Whether `error` was raised directly in one of the `_VALIDATORS`."""
    module, qualname = _raised_in(error)
    return qualname in _VALIDATORS.get(module, ())


def _raised_in(error: BaseException) -> tuple[str | None, str | None]:
    """(module, qualified name) of the function that raised `error` (its innermost frame)."""
    tb = error.__traceback__
    if tb is None:
        return None, None
    while tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame
    return frame.f_globals.get("__name__"), frame.f_code.co_qualname


def _is_unreachable_store(error: BaseException) -> bool:
    """botocore could not connect to the S3 endpoint at all (nothing listens, DNS, timeout)."""
    exceptions = sys.modules.get("botocore.exceptions")
    return exceptions is not None and isinstance(error, exceptions.ConnectionError)


def _one_line(error: BaseException) -> str:
    from model.storage import redact

    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    message = " ".join(message.split()) or type(error).__name__
    if _is_unreachable_store(error):
        message = (f"cannot reach the object store: {message}; check AWS_ENDPOINT_URL / "
                   "AWS_ENDPOINT_URL_S3 or the URI's ?endpoint=")
    return redact(message)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake in the command line is one line on stderr (exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} "
                     f"(see {self.prog} --help)\n")


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


# ----------------------------------------------------------------- checks before anything runs

def _filesystem(uri: str, what: str):
    """(fsspec filesystem, path) of a URI the user gave as `what`; an unknown scheme or a
    missing fsspec package is a UserError naming the URI."""
    from model.storage import filesystem_for, shown_uri

    try:
        found = filesystem_for(uri)
    except (ValueError, ImportError) as e:
        message = " ".join(str(e).split())
        shown = shown_uri(uri)
        raise UserError(f"{what} {shown}: {message}" if shown not in message
                        else f"{what}: {message}") from None
    _check_endpoint(uri, what)
    return found


_PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy",
                    "all_proxy")


def _check_endpoint(uri: str, what: str) -> None:
    """An S3 endpoint set by the user (AWS_ENDPOINT_URL[_S3], ?endpoint=) must accept a TCP
    connection: botocore retries a refused one for about a minute before it gives up. Not
    probed: AWS's own endpoints, and any endpoint when a proxy is configured."""
    from urllib.parse import urlsplit

    from model.storage import s3_endpoint, shown_uri

    if urlsplit(uri).scheme not in ("s3", "s3a") or any(os.environ.get(k)
                                                         for k in _PROXY_VARIABLES):
        return
    endpoint = s3_endpoint(uri)
    if not endpoint:
        return
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UserError(f"the S3 endpoint {endpoint} has an invalid port") from None
    if parts.hostname:
        _probe(parts.hostname, port, f"cannot reach the object store at {endpoint} (for "
               f"{what} {shown_uri(uri)})")


def _local_path(uri: str) -> str | None:
    from model.storage import absolute, is_remote

    return None if is_remote(uri) else absolute(uri)


def _check_folder_target(uri: str, what: str) -> None:
    """`uri` is where a folder gets written: it must not be a file, nor lie below one."""
    from model.storage import shown_uri

    fs, path = _filesystem(uri, what)
    local = _local_path(uri)
    if local is None:
        if fs.isfile(path):
            raise UserError(f"{what} {shown_uri(uri)} is an existing file; pass a folder "
                            "(prefix) to write into")
        return
    for place in (local, *_parents(local)):
        if os.path.exists(place):
            if not os.path.isdir(place):
                where = "is an existing file" if place == local else f"lies inside the file {place}"
                raise UserError(f"{what} {uri} {where}; pass a folder to write into")
            return


def _check_file_target(uri: str, what: str) -> None:
    """`uri` is a file to write: not a folder, and (locally) its folder must exist."""
    _filesystem(uri, what)
    local = _local_path(uri)
    if local is None:
        return
    if os.path.isdir(local):
        raise UserError(f"{what} {uri} is a folder; pass a file name to write")
    folder = os.path.dirname(local)
    if not os.path.isdir(folder):
        raise UserError(f"{what} {uri}: the folder {folder} does not exist; create it first")


def _parents(path: str) -> list[str]:
    out = []
    while (parent := os.path.dirname(path)) != path:
        out.append(parent)
        path = parent
    return out


def _read_json(uri: str, what: str, *, keys: tuple[str, ...] = ()) -> None:
    """`uri` must be a JSON file (with `keys`, if it is an object)."""
    import json

    from model.storage import shown_uri

    fs, path = _filesystem(uri, what)
    if fs.isdir(path):
        raise UserError(f"{what} {shown_uri(uri)} is a folder; pass the .json file")
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{what} {shown_uri(uri)} does not exist") from None
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{what} {shown_uri(uri)} is not JSON ({e}); pass a COCO panoptic "
                        ".json file") from None
    missing = [k for k in keys if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise UserError(f"{what} {shown_uri(uri)} is not COCO panoptic JSON: it has no "
                        f"{missing[0]!r}")


def _check_ray_address(address: str | None, what: str = "--address") -> None:
    """A Ray address given as host:port (or ray://host:port) must accept a TCP connection;
    ray.init would otherwise wait for minutes for a cluster that is not there."""
    if not address or address in ("auto", "local"):
        return
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # a form Ray resolves itself
    _probe(host.strip("[]") or "127.0.0.1", int(port),
           f"cannot reach a Ray cluster at {what} {address}")


def _probe(host: str, port: int, failure: str) -> None:
    import socket

    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as e:
        raise UserError(f"{failure}: nothing answers on {host}:{port} "
                        f"({e.strerror or e or 'timed out'})") from None


def _check_bundle(uri: str, what: str = "--model") -> None:
    """A model bundle (config.json read and checked; the weights are not loaded)."""
    from model.storage import shown_uri

    fs, path = _filesystem(uri, what)
    if fs.isfile(path):
        raise UserError(f"{what} {shown_uri(uri)} is a file; a model bundle is a folder with "
                        "config.json and model.safetensors")
    from model.bundle import read_bundle_config

    read_bundle_config(uri)  # BundleError / FileNotFoundError: one sentence naming the URI


class _FirstShard(Exception):
    pass


def _check_source(src: str, *, files_per_shard: int, image_column: str | None) -> None:
    """SRC holds image inputs. A local folder is listed up to its first shard (and its first
    Parquet footer checked); remote stores get one request, so a big archive is not listed
    twice (the job's own listing then reports what is wrong inside it)."""
    from model.storage import shown_uri, storage_errors

    fs, root = _filesystem(src, "SRC")
    if _local_path(src) is None:
        with storage_errors(src):
            try:
                fs.info(root)
            except FileNotFoundError:
                raise UserError(f"nothing found at {shown_uri(src)}; check the path (and "
                                "bucket name)") from None
        return
    from pipeline.segment.parquet import check_columns
    from pipeline.segment.sources import list_shards

    first = []

    def stop(shard) -> None:
        first.append(shard)
        raise _FirstShard

    try:
        list_shards(src, files_per_shard=files_per_shard, image_column=image_column,
                    on_shard=stop)
    except _FirstShard:
        pass
    if first and first[0].kind == "parquet":
        check_columns(first[0])  # a missing --image-column: ValueError of a validator


def check_segment(p) -> None:
    """Everything about a segment job that can be checked before it takes DST's lock."""
    _filesystem(p.src, "SRC")
    _check_folder_target(p.dst, "DST")
    if not p.predictor:
        _filesystem(p.model, "--model")
    ray = sys.modules.get("ray")
    if p.address:  # an address given on the command line is checked whatever else runs
        _check_ray_address(p.address, "--address")
    elif not (ray is not None and ray.is_initialized()):  # else the job uses that Ray
        _check_ray_address(os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")
    _check_source(p.src, files_per_shard=p.files_per_shard, image_column=p.image_column)
    if p.predictor and isinstance(p.predictor, str):
        from pipeline.segment.rows import load_predictor

        load_predictor(p.predictor)  # PredictorError: one sentence
    elif not p.predictor:
        _check_bundle(p.model)


def check_finetune(p) -> None:
    """Everything about a finetune job that can be checked before Ray starts."""
    from model.config import PRESETS

    if "://" not in p.model and "/" not in p.model:
        _check_preset(p.model)
    _filesystem(p.train, "--train")
    if p.val:
        _filesystem(p.val, "--val")
    _check_folder_target(p.storage, "--storage")
    if p.model not in PRESETS:
        _filesystem(p.model, "--model")
    _check_ray_address(p.address)
    from model.storage import shown_uri
    from pipeline.train.data import LSJConfig, split_layout

    LSJConfig(crop_size=p.crop_size, min_scale=p.min_scale, max_scale=p.max_scale)
    for uri, what in ((p.train, "--train"), (p.val, "--val")):
        if not uri:
            continue
        fs, path = _filesystem(uri, what)
        if not fs.exists(path):
            raise UserError(f"{what} {shown_uri(uri)} does not exist; a split is a COCO "
                            "panoptic folder (panoptic.json, images/, panoptic/)")
        split_layout(uri)  # FileNotFoundError naming what is missing (val: read by the
        # workers only, minutes later)
    if p.model not in PRESETS:
        _check_bundle(p.model)


@contextlib.contextmanager
def _recording_sigint() -> Iterator[threading.Event]:
    """Notes a Ctrl-C even where a library installs its own SIGINT handler for the time being
    (Ray Train's trainer.fit aborts the run on SIGINT and then exits the process with status 0
    or 1 and no word): the handler it installs is wrapped so that the event is set first."""
    import signal

    interrupted = threading.Event()
    install = signal.signal

    def recording(signum, handler):
        if signum == signal.SIGINT and callable(handler):
            inner = handler

            def handler(sig, frame):
                interrupted.set()
                return inner(sig, frame)
        return install(signum, handler)

    previous = signal.getsignal(signal.SIGINT)
    signal.signal = recording
    try:
        yield interrupted
    finally:
        signal.signal = install
        if threading.current_thread() is threading.main_thread() and previous is not None:
            install(signal.SIGINT, previous)


def _exists(uri: str) -> bool:
    """Whether anything is at `uri` (True when that cannot be told)."""
    local = _local_path(uri)
    if local is not None:
        return os.path.exists(local)
    try:
        fs, path = _filesystem(uri, "DST")
        return fs.exists(path)
    except Exception:  # noqa: BLE001 - unknown: then nothing is ever removed
        return True


def _remove_if_left_empty(uri: str) -> None:
    """Remove an output this run created and left without any data (a refused run): empty
    folders and the output's own marker, nothing else (os.rmdir never removes a folder that
    holds a file). Never raises: the run's own error is what the user must see."""
    try:
        from pipeline.segment.shards import OUTPUT_MARKER
    except ImportError:
        OUTPUT_MARKER = None  # noqa: N806
    try:
        local = _local_path(uri)
        if local is None:
            fs, path = _filesystem(uri, "DST")
            marker = f"{path.rstrip('/')}/{OUTPUT_MARKER}"
            if OUTPUT_MARKER and fs.find(path) == [marker]:
                fs.rm_file(marker)
            return
        for root, _, files in os.walk(local, topdown=False):
            if root == local and OUTPUT_MARKER and files == [OUTPUT_MARKER]:
                os.remove(os.path.join(root, OUTPUT_MARKER))
            try:
                os.rmdir(root)
            except OSError:
                pass
    except Exception as e:  # noqa: BLE001
        log.debug("could not remove the empty output %s: %s", uri, e)


def _add_param_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One argument per field of a job's parameter class: `--batch-size` for `batch_size`, the
    type from its annotation, its help and default from its `param`. Every default here is
    None, so that only the flags given override a --spec; the real defaults are the class's."""
    from pipeline.params import job_fields, param_types

    hints = param_types(cls)
    for f in job_fields(cls):
        tp, _ = hints[f.name]
        help_text = f.metadata["help"]
        if f.default is not dataclasses.MISSING and f.default is not None:
            shown = ("on" if f.default else "off") if tp is bool else f.default
            help_text += f" (default: {shown})"
        help_text = help_text.replace("%", "%%")
        metavar = f.metadata["metavar"]
        if f.metadata["positional"]:
            p.add_argument(f.name, nargs="?", metavar=metavar, help=help_text)
        elif tp is bool:
            p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                           default=None, help=help_text)
        else:
            p.add_argument(_flag(f.name), dest=f.name, type=tp, default=None, metavar=metavar,
                           choices=f.metadata.get("choices"), help=help_text)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _job_params(kind: str, args: argparse.Namespace):
    """The job's parameters from `--spec FILE` (if given), then the flags given on top."""
    from jobs.spec import KINDS, load_spec, parse_spec
    from pipeline.params import as_kwargs, job_fields

    values: dict = {}
    if args.spec:
        spec = load_spec(args.spec)
        if spec.kind != kind:
            raise UserError(f"{args.spec} is a {spec.kind} spec; use `panoray {spec.kind}`")
        values = as_kwargs(spec.args)
    fields = job_fields(KINDS[kind])
    values.update({f.name: getattr(args, f.name) for f in fields
                   if getattr(args, f.name) is not None})
    for f in fields:
        if f.default is dataclasses.MISSING and not values.get(f.name):
            metavar = f.metadata["metavar"]
            shown = metavar if f.metadata["positional"] else \
                " ".join([_flag(f.name)] + ([metavar] if metavar else []))
            raise UserError(f"{kind} needs {shown} (or a --spec that sets {f.name!r})")
    return parse_spec({"kind": kind, **values}, source="command line").args


def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="segment an image archive into Parquet (one row/image)",
                       description="Read image shards at SRC, predict panoptic segmentations with "
                       "the model bundle, write one Parquet row per image under DST. Re-runs "
                       "skip shards already done.")
    from pipeline.params import SegmentParams

    p.add_argument("--spec", help="a segment job spec (YAML); flags given here override it")
    _add_param_flags(p, SegmentParams)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (a line per "
                   "committed shard still goes to the log)")
    p.set_defaults(func=cmd_segment)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def cmd_segment(args: argparse.Namespace) -> int:
    params = _job_params("segment", args)
    check_segment(params)
    from pipeline.segment.job import run_segment

    # Ray Data draws bars on stderr when stdout is a terminal, else it logs a block of a dozen
    # lines every 10 s: only a terminal on stderr gets them. Off a terminal the job's own line
    # per committed shard (counts and rate so far) is the progress.
    progress = not args.no_progress and _isatty(sys.stderr) and _isatty(sys.stdout)
    created = not _exists(params.dst)
    try:
        with _quiet_stderr():
            summary = run_segment(params=params, progress=progress)
    except BaseException:
        if created:  # refused after the lock was taken (e.g. too many actors for the cluster)
            _remove_if_left_empty(params.dst)
        raise
    print(summary.render())
    return 0 if summary.images_failed == 0 or summary.images_ok > 0 else 1


def _add_finetune(sub) -> None:
    from pipeline.params import FinetuneParams

    p = sub.add_parser("finetune", help="fine-tune on COCO-panoptic data with Ray Train (DDP)",
                       description="Train a preset (random init) or a bundle on a COCO panoptic "
                       "split at any URI; checkpoints go to --storage; re-running the same "
                       "--name resumes from its latest checkpoint.")
    p.add_argument("--spec", help="a finetune job spec (YAML); flags given here override it")
    _add_param_flags(p, FinetuneParams)
    p.add_argument("--no-progress", action="store_true", help="no progress bars of the data "
                   "stream (they are drawn on a terminal only); the step lines, every 10 s, "
                   "stay")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    params = _job_params("finetune", args)
    check_finetune(params)
    from pipeline.train.job import run_finetune

    # The data stream runs in a Ray actor, whose bars the driver redraws whatever stderr is.
    progress = not args.no_progress and _isatty(sys.stderr)
    with _recording_sigint() as interrupted:
        try:
            with _quiet_stderr():
                result = run_finetune(params=params, progress=progress)
        except BaseException:
            if interrupted.is_set():  # Ray Train's own Ctrl-C handling ends in SystemExit
                raise KeyboardInterrupt from None
            raise
    if interrupted.is_set():  # an aborted run returns: it did not finish
        raise KeyboardInterrupt
    metrics = result.get("metrics") or {}
    print(f"finetune {result['name']}: step {result['step']} (started at "
          f"{result['start_step']}); final bundle {result['final_bundle']}")
    if "pq" in metrics:
        print(f"PQ on val: {metrics['pq']:.3f}")
    return 0


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic COCO-panoptic dataset",
                       description="Write a synthetic panoptic dataset (train and val splits, "
                       "COCO panoptic format) at DST; deterministic by seed.")
    p.add_argument("dst", help="output URI")
    p.add_argument("--train", type=_at_least(0), default=200, help="train images")
    p.add_argument("--val", type=_at_least(0), default=40, help="val images")
    p.add_argument("--size", type=_at_least(64), default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    _add_no_progress(p)
    p.set_defaults(func=cmd_synth)


def _add_no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress (otherwise: a line "
                   "rewritten in place on a terminal, a log line every 10 s in a log)")


def cmd_synth(args: argparse.Namespace) -> int:
    _check_folder_target(args.dst, "DST")
    from pipeline.coco.synth import make_synthetic_dataset

    summary = make_synthetic_dataset(args.dst, num_train=args.train, num_val=args.val,
                                     image_size=(args.size, args.size), seed=args.seed,
                                     progress=not args.no_progress)
    print(summary)
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="import official Mask2Former weights as a model bundle",
                       description="Convert a Hugging Face save_pretrained folder or a reference "
                       "detectron2 .pkl into a panoray model bundle at DST.")
    p.add_argument("--from", dest="fmt", choices=["hf", "detectron2"], required=True)
    p.add_argument("src", help="HF folder, or .pkl file (local or URI)")
    p.add_argument("dst", help="bundle URI to write")
    p.add_argument("--preset", help="architecture of a detectron2 .pkl (e.g. r50-coco-panoptic)")
    p.add_argument("--name", help="bundle name (default: the preset / folder name)")
    p.add_argument("--categories", metavar="FILE", help="the label space, for a checkpoint "
                   "trained on other labels: a JSON list of {id, name, isthing, color} in label "
                   "order, or a COCO panoptic JSON holding \"categories\"")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    import pickle

    from model.storage import shown_uri

    fs, path = _filesystem(args.src, "SRC")
    shown = shown_uri(args.src)
    _check_folder_target(args.dst, "DST")
    categories = None
    if args.categories:
        _read_json(args.categories, "--categories")
        from pipeline.coco.categories import model_categories, read_categories

        categories = model_categories(read_categories(args.categories))
    if args.fmt == "hf":
        local = _local_path(args.src)
        if local is None:
            raise UserError(f"SRC {shown}: --from hf reads a local save_pretrained folder; "
                            "download it first")
        if not os.path.isdir(local):
            if os.path.exists(local):
                raise UserError(f"SRC {shown} is a file; --from hf takes a Hugging Face "
                                "save_pretrained folder (config.json + model.safetensors)")
            raise UserError(f"SRC {shown} does not exist")
        from model.convert_hf import convert_hf

        try:
            config, state_dict = convert_hf(args.src, categories=categories)
        except ValueError as e:
            if _raised_in(e) != ("model.convert_hf", "_categories"):
                raise
            if args.categories:  # the file's count differs from the checkpoint's classes
                raise UserError(f"--categories {shown_uri(args.categories)}: {e}") from None
            raise UserError(f"SRC {shown}: the checkpoint's config.json does not say which "
                            "classes are things; pass --categories FILE (a JSON list of {id, "
                            "name, isthing, color} in label order, or a COCO panoptic JSON "
                            "holding \"categories\")") from None
    else:
        if not args.preset:
            raise UserError("a detectron2 .pkl holds no architecture: pass --preset, e.g. "
                            "--preset r50-coco-panoptic")
        _check_preset(args.preset)
        if fs.isdir(path):
            raise UserError(f"SRC {shown} is a folder; --from detectron2 takes the .pkl file")
        if not fs.exists(path):
            raise UserError(f"SRC {shown} does not exist")
        from model.convert_detectron2 import UnsafeCheckpointError, convert_detectron2

        try:
            config, state_dict = convert_detectron2(args.src, preset=args.preset,
                                                    categories=categories)
        except UnsafeCheckpointError as e:
            raise UserError(f"SRC {shown}: {e}") from None
        except (pickle.UnpicklingError, EOFError) as e:
            raise UserError(f"SRC {shown} is not a detectron2 .pkl checkpoint "
                            f"({e or 'the file ends early'})") from None
    from model.bundle import load_state_dict_into, save_bundle
    from model.mask2former import build_model

    log.info("read %d tensors from %s; writing the bundle to %s", len(state_dict), shown,
             shown_uri(args.dst))
    net = build_model(config)
    load_state_dict_into(net, state_dict)
    model_id = save_bundle(net, args.dst, name=args.name)
    print(f"wrote bundle {model_id} to {shown_uri(args.dst)}")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="PQ of a segment output (or panoptic JSON) vs ground truth",
                       description="Panoptic quality, identical to panopticapi's. PRED is a "
                       "segment output URI (its Parquet rows are matched to ground-truth images "
                       "by file name) or a COCO panoptic prediction JSON.")
    p.add_argument("pred", help="segment output URI, or a prediction JSON")
    p.add_argument("gt", help="ground-truth COCO panoptic JSON (its PNG folder is beside it)")
    p.add_argument("--gt-folder", help="ground-truth PNG folder (default: JSON path minus .json)")
    p.add_argument("--pred-folder", help="prediction PNG folder, for a prediction JSON")
    p.add_argument("--out", help="also write the result as JSON here")
    _add_no_progress(p)
    p.set_defaults(func=cmd_evaluate)


def check_evaluate(args: argparse.Namespace) -> None:
    """PRED, GT, their PNG folders and --out, before any image is read."""
    from model.storage import shown_uri

    def folder_of(json_uri: str, given: str | None, what: str) -> None:
        folder = given or (json_uri[: -len(".json")] if json_uri.endswith(".json") else None)
        if folder is None:
            raise UserError(f"cannot tell where the PNGs of {shown_uri(json_uri)} are (it does "
                            f"not end in .json); pass {what}")
        fs, path = _filesystem(folder, what)
        if not fs.isdir(path):
            raise UserError(f"no PNG folder at {shown_uri(folder)}" +
                            ("" if given else f"; pass {what}"))

    if args.pred.endswith(".json"):
        _read_json(args.pred, "PRED", keys=("annotations",))
    else:
        _check_segment_output(args.pred, "PRED", alternative=", or pass a prediction .json")
    _read_json(args.gt, "GT", keys=("annotations", "categories"))
    folder_of(args.gt, args.gt_folder, "--gt-folder")
    if args.pred.endswith(".json"):
        folder_of(args.pred, args.pred_folder, "--pred-folder")
    if args.out:
        _check_file_target(args.out, "--out")


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    check_evaluate(args)
    from pipeline.evaluate import format_pq_table, pq_compute
    from pipeline.segment.output import evaluate_output, results_json

    try:
        if args.pred.endswith(".json"):
            results = pq_compute(args.gt, args.pred, args.gt_folder, args.pred_folder, workers=1)
            text, doc = format_pq_table(results), json.dumps(results, indent=2, default=str)
        else:
            evaluation = evaluate_output(args.pred, args.gt, args.gt_folder,
                                         progress=not args.no_progress)
            text, doc = evaluation.render(), results_json(evaluation)
    except KeyError as e:  # predictions and ground truth disagree (ids, categories)
        raise UserError(str(e.args[0] if e.args else e)) from None
    print(text)
    if args.out:
        from model.storage import get_filesystem

        fs, path = get_filesystem(args.out)
        fs.pipe_file(path, doc.encode())
    return 0


def _check_segment_output(uri: str, what: str, *, alternative: str = "") -> None:
    """A segment job's output (URI/data is a folder), else one sentence."""
    from model.storage import join, shown_uri

    fs, path = _filesystem(join(uri, "data"), what)
    if not fs.isdir(path):
        raise UserError(f"no segment output under {shown_uri(uri)}/data; run `panoray segment` "
                        f"first{alternative}")


def _check_target_beside(dst: str, output: str, purpose: str) -> None:
    """DST a folder target that is not the segment output itself."""
    from model.storage import absolute, shown_uri

    _check_folder_target(dst, "DST")
    if absolute(shown_uri(dst)).rstrip("/") == absolute(shown_uri(output)).rstrip("/"):
        raise UserError(f"DST {shown_uri(dst)} is the segment output itself; pass another "
                        f"folder to {purpose}")


def _add_show(sub) -> None:
    p = sub.add_parser("show", help="overlay pictures + contact sheet from a segment output",
                       description="Draw the segments of up to --limit images of a segment "
                       "output over the original images, with class names and colours.")
    p.add_argument("output", help="segment output URI")
    p.add_argument("dst", help="folder/URI for the PNGs")
    p.add_argument("--model", help="bundle whose config.json names and colours the classes")
    p.add_argument("--categories", help="or a COCO JSON with categories")
    p.add_argument("--limit", type=_at_least(1), default=16, help="images drawn (default 16)")
    _add_no_progress(p)
    p.set_defaults(func=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    _check_segment_output(args.output, "OUTPUT")
    _check_folder_target(args.dst, "DST")
    if args.model:
        _check_bundle(args.model)
    if args.categories:
        _read_json(args.categories, "--categories")
    from pipeline.segment.show import show

    summary = show(args.output, args.dst, model=args.model, categories=args.categories,
                   limit=args.limit, progress=not args.no_progress)
    print(f"wrote {len(summary.written)} overlays and {summary.contact_sheet}")
    if summary.skipped:
        print(f"{len(summary.skipped)} original images could not be read; drawn on grey")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="a segment output as COCO panoptic / instances or "
                       "semantic PNGs", description="Write the ok rows of a segment output as "
                       "files other tools read, at any URI: coco-panoptic (panoptic.json + "
                       "panoptic/*.png), coco-instances (instances.json, RLE masks of thing "
                       "classes) or semantic-png (SegmentationClass/*.png of class indices, 0 = "
                       "void, + classes.json and CVAT's labelmap.txt). Error rows are skipped "
                       "and counted.")
    p.add_argument("output", metavar="OUT", help="segment output URI")
    p.add_argument("dst", metavar="DST", help="folder/URI to write the export into")
    p.add_argument("--format", dest="export_format", default="coco-panoptic",
                   choices=["coco-panoptic", "coco-instances", "semantic-png"],
                   help="what to write (default: coco-panoptic)")
    p.add_argument("--model", help="bundle whose config.json gives the label space")
    p.add_argument("--categories", metavar="FILE", help="or a JSON file of categories (a list "
                   "of {id, name, isthing, color} in label order, or a COCO JSON)")
    _add_no_progress(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    _check_segment_output(args.output, "OUT")
    _check_target_beside(args.dst, args.output, "export into")
    if bool(args.model) == bool(args.categories):
        raise UserError("export needs the label space once: pass --model BUNDLE or "
                        "--categories FILE" + (", not both" if args.model else ""))
    if args.model:
        _check_bundle(args.model)
    else:
        _read_json(args.categories, "--categories")
    from pipeline.segment.export import export_output

    summary = export_output(args.output, args.dst, format=args.export_format, model=args.model,
                            categories=args.categories, progress=not args.no_progress)
    print(summary.render())
    return 0 if summary.images > 0 or summary.errors_skipped == 0 else 1


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="a static HTML report of a segment output (counts, "
                       "errors, classes, PQ, a gallery)",
                       description="Write DST/report.html, one page that opens from the file "
                       "system (nothing fetched from the network): the run's counts, its error "
                       "rows, per-class counts and areas, PQ / SQ / RQ against --gt, and a "
                       "paged gallery of overlays (the pictures in DST/overlays/). A progress "
                       "line goes to stderr every 10 s.")
    p.add_argument("output", metavar="OUTPUT", help="segment output URI")
    p.add_argument("dst", metavar="DST", help="folder/URI for report.html and overlays/")
    p.add_argument("--model", metavar="BUNDLE", help="bundle whose config.json names and "
                   "colours the classes")
    p.add_argument("--categories", metavar="JSON", help="or a JSON file of categories (a list "
                   "of {id, name, isthing, color}, or a COCO JSON)")
    p.add_argument("--gt", metavar="GT_JSON", help="COCO panoptic ground truth: adds PQ / SQ / "
                   "RQ (its PNG folder is beside it)")
    p.add_argument("--gt-folder", metavar="FOLDER", help="ground-truth PNG folder (default: "
                   "GT_JSON minus .json)")
    p.add_argument("--limit", type=_at_least(0), default=240, help="images in the gallery, the "
                   "first by image id (default 240; 0: no gallery)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from model.storage import shown_uri

    _check_segment_output(args.output, "OUTPUT")
    _check_target_beside(args.dst, args.output, "write the report into")
    if args.model and args.categories:
        raise UserError("report takes the class names once: pass --model BUNDLE or "
                        "--categories JSON, not both")
    if args.model:
        _check_bundle(args.model)
    if args.categories:
        _read_json(args.categories, "--categories")
        from pipeline.coco.categories import read_categories

        read_categories(args.categories)  # a bad entry: a validator's ValueError, one sentence
    if args.gt_folder and not args.gt:
        raise UserError("--gt-folder needs --gt GT_JSON (the ground truth's panoptic JSON)")
    if args.gt:
        _read_json(args.gt, "--gt", keys=("annotations", "categories"))
        folder = args.gt_folder or (args.gt[: -len(".json")] if args.gt.endswith(".json")
                                    else None)
        if folder is None:
            raise UserError(f"cannot tell where the PNGs of {shown_uri(args.gt)} are (it does "
                            "not end in .json); pass --gt-folder")
        gt_fs, gt_path = _filesystem(folder, "--gt-folder")
        if not gt_fs.isdir(gt_path):
            raise UserError(f"no PNG folder at {shown_uri(folder)}" +
                            ("" if args.gt_folder else "; pass --gt-folder"))
    from pipeline.segment.report import prepare_report, write_report

    try:  # reads only: a mistake found here leaves DST untouched
        prepared = prepare_report(args.output, model=args.model, categories=args.categories,
                                  gt=args.gt, gt_folder=args.gt_folder, limit=args.limit)
    except KeyError as e:  # predictions and ground truth disagree (ids, categories)
        raise UserError(str(e.args[0] if e.args else e)) from None
    summary = write_report(prepared, args.dst)
    print(summary.render())
    return 0


def _add_submit(sub) -> None:
    p = sub.add_parser("submit", help="run a job spec on a running Ray cluster (Jobs API)",
                       description="Check SPEC locally, then submit it to the Ray cluster whose "
                       "dashboard is at --address; prints the submission id and the command "
                       "that follows its log. Paths in SPEC: URIs (s3://, gs://) go as they "
                       "are; for a cluster on this machine (127.0.0.1, localhost) relative "
                       "paths are made absolute; for a remote cluster local paths are refused "
                       "unless --paths-on-cluster.")
    p.add_argument("spec", help="job spec YAML (kind: segment | finetune)")
    p.add_argument("--address", required=True, help="dashboard URL, e.g. http://HEAD:8265")
    p.add_argument("--wait", action="store_true", help="stream the job's log until it ends; "
                   "exit 0 when it succeeded, 1 (with its last error line) when not")
    p.add_argument("--paths-on-cluster", action="store_true", help="the absolute local paths "
                   "in SPEC are paths every node of the cluster mounts: send them as they are")
    p.set_defaults(func=cmd_submit)


def _add_logs(sub) -> None:
    p = sub.add_parser("logs", help="print (or follow) the log of a submitted job",
                       description="Print the log of the job JOB_ID (as `panoray submit` "
                       "printed it) from the Ray cluster whose dashboard is at --address, with "
                       "the same token discovery as submit (RAY_AUTH_TOKEN, "
                       "RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).")
    p.add_argument("job_id", metavar="JOB_ID", help="submission id, e.g. raysubmit_...")
    p.add_argument("--address", required=True, help="dashboard URL, e.g. http://HEAD:8265")
    p.add_argument("--follow", action="store_true", help="keep printing until the job ends; "
                   "exit 0 when it succeeded, 1 (with its last error line) when not")
    p.set_defaults(func=cmd_logs)


def _check_submit_url(address: str):
    """The dashboard's URL must be http(s)://host:port (a Ray address without a scheme would
    make the Jobs client wait for a GCS for a minute); returns (host, port)."""
    from urllib.parse import urlsplit

    if "://" not in address:
        raise UserError(f"--address {address} is not a URL; add http:// (the dashboard's URL, "
                        f"e.g. http://{address})")
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https", "ray"):
        raise UserError(f"--address {address}: use the dashboard's http:// URL, e.g. "
                        "http://HEAD:8265")
    try:
        port = parts.port or {"http": 80, "https": 443, "ray": 10001}[parts.scheme]
    except ValueError:
        raise UserError(f"--address {address} has an invalid port") from None
    return parts.hostname or "127.0.0.1", port


def check_submit_address(address: str) -> None:
    """The dashboard's URL, well formed (`_check_submit_url`) and accepting a connection."""
    host, port = _check_submit_url(address)
    _probe(host, port, f"cannot reach a Ray cluster at {address}")


@contextlib.contextmanager
def _jobs_api(address: str, job_id: str | None = None) -> Iterator[None]:
    """The Jobs API's failures that are the user's to fix, as one sentence: nothing answers,
    a token is missing or refused, no such job."""
    try:
        yield
    except ConnectionError as e:
        raise UserError(f"cannot reach a Ray cluster at {address}: {e}") from None
    except Exception as e:  # noqa: BLE001 - only the user's are turned into UserError
        if type(e).__name__ == "AuthenticationError":  # ray.exceptions: a 401 or a 403
            said = (str(e).strip().splitlines() or ["no token"])[0].rstrip(".")
            raise UserError(f"the cluster at {address} refused panoray ({said}); give it the "
                            "cluster's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                            "~/.ray/auth_token (`ray get-auth-token` on the head prints it), "
                            "with RAY_AUTH_MODE unset or token") from None
        if isinstance(e, RuntimeError) and job_id is not None and "status code 404" in str(e):
            raise UserError(f"the cluster at {address} has no job {job_id!r}; pass the "
                            "submission id `panoray submit` printed (raysubmit_...)") from None
        raise


def _follow_command(job_id: str, address: str) -> str:
    return f"panoray logs {job_id} --address {address} --follow"


def _report_end(end, address: str, command: str) -> int:
    """How a followed job ended: its summary (exit 0) or its last error line (exit 1)."""
    if end.status == "SUCCEEDED":
        print(f"job {end.job_id} SUCCEEDED" + ("" if not end.summary else ":"))
        for line in end.summary:
            print(f"  {line}")
        return 0
    if end.error is None:  # still running (a time limit of the caller's)
        print(f"job {end.job_id} is {end.status}; {_follow_command(end.job_id, address)}")
        return 1
    print(f"panoray {command}: job {end.job_id} {end.status}: {end.error}", file=sys.stderr)
    return 1


def cmd_submit(args: argparse.Namespace) -> int:
    from jobs.spec import load_spec
    from jobs.submit import place_paths

    spec = load_spec(args.spec)  # a mistake in the spec is named before the cluster is contacted
    _check_submit_url(args.address)
    place_paths(spec, address=args.address, paths_on_cluster=args.paths_on_cluster)
    check_submit_address(args.address)
    from jobs.submit import connect, follow, submit

    with _jobs_api(args.address):
        client = connect(args.address)
        job_id = submit(args.spec, address=args.address, paths_on_cluster=args.paths_on_cluster,
                        client=client)
    print(f"submitted {job_id} to {args.address}", flush=True)
    if not args.wait:
        print(f"follow it with: {_follow_command(job_id, args.address)}")
        return 0
    print(f"its log (also later: {_follow_command(job_id, args.address)}):", flush=True)
    try:
        with _jobs_api(args.address, job_id):
            end = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"panoray submit: stopped following {job_id}, which keeps running on the "
              f"cluster: {_follow_command(job_id, args.address)}", file=sys.stderr)
        raise
    return _report_end(end, args.address, "submit")


def cmd_logs(args: argparse.Namespace) -> int:
    import re

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.job_id):
        raise UserError(f"{args.job_id!r} is not a job id; pass the submission id `panoray "
                        "submit` printed (raysubmit_...)")
    check_submit_address(args.address)
    from jobs.submit import connect, follow

    with _jobs_api(args.address, args.job_id):
        client = connect(args.address)
        client.get_job_info(args.job_id)  # a job id the cluster does not know: one sentence
        if not args.follow:
            sys.stdout.write(client.get_job_logs(args.job_id) or "")
            return 0
        end = follow(client, args.job_id)
    return _report_end(end, args.address, "logs")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole product on synthetic data, in minutes",
                       description="Synthetic archive -> model -> segment on a local Ray -> PQ "
                       "-> overlays; prints where everything is.")
    p.add_argument("--out", default="demo-out", help="where everything goes (default demo-out)")
    p.add_argument("--train-steps", type=_at_least(1), help="train tiny this many steps "
                   "instead of using the shipped demo bundle")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    _check_folder_target(args.out, "--out")
    from jobs.demo import run_demo

    progress = _isatty(sys.stderr)  # Ray Data's bars: on a terminal only (as segment, finetune)
    with _quiet_stderr():
        run_demo(out=args.out, train_steps=args.train_steps, progress=progress)
    return 0


def _check_preset(name: str) -> None:
    from model.config import PRESETS

    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")


def build_parser(extra: Sequence[Callable] = ()) -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="panoray",
        description="Mask2Former panoptic segmentation of image archives on Ray, and "
        "fine-tuning with the same model code.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging of panoray's own modules (libraries stay at INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_segment, _add_finetune, _add_evaluate, _add_show, _add_export, _add_report,
                _add_synth, _add_convert, _add_submit, _add_logs, _add_demo, *extra):
        add(sub)
    return parser


class _Redacting(logging.Filter):
    """Takes credentials (as `model.storage.redact` knows them) out of every record printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted stays as it is
            return True
        from model.storage import redact

        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever `sys.stderr` is when a record is emitted: `main` may run
    in a host (a notebook, a test) that swaps stderr after the handler was installed."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(verbose: bool) -> None:
    """INFO on stderr; `verbose`: DEBUG for panoray's own loggers only (OWN_LOGGERS). Libraries
    stay at INFO whatever the flag: botocore at DEBUG logs request headers, credentials in
    them."""
    root = logging.getLogger()
    before = set(root.handlers)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S", handlers=[_StderrHandler()])
    for handler in root.handlers:
        if handler not in before:  # ours: a host's own handlers (pytest's...) are left alone
            handler.addFilter(_Redacting())
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.NOTSET)
    for name, start in _RAY_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Dropping) and f.start == start for f in logger.filters):
            logger.addFilter(_Dropping(start))


# Ray's log records about a choice panoray makes on purpose, dropped so that a healthy run
# prints no WARNING: (logger, how the message starts).
_RAY_NOISE = (
    # the Ray instance of its own that a job starts on this machine has a token (Ray's default)
    ("ray._private.authentication.authentication_token_setup",
     "Token authentication is enabled for this Ray cluster"),
    ("ray.data._internal.progress", "Progress bars disabled"),  # --no-progress
)


class _Dropping(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


# What Ray writes straight to this process's stderr on a healthy run that is no fault of the
# run: its C++ core worker's ERROR line for every Ray Data actor (the actor pool passes its
# arguments through the object store; ray-project/ray#57733; the line stays in Ray's own log
# files), the progress-bar warning of Ray Data in workers (forwarded lines) when panoray
# turned the bars off, and the deprecation warning (two lines) that Ray Train's own use of Ray
# Data's ExecutionOptions raises in every fine-tune.
_STDERR_NOISE = (b"has constructor arguments in the object store and max_restarts",
                 b"Progress bars disabled. To enable",
                 b"`ExecutionOptions.exclude_resources` is deprecated",
                 b"  self.exclude_resources = exclude_resources")
_FLUSHED = b"\x00panoray: stderr flushed\x00"


@contextlib.contextmanager
def _quiet_stderr(noise: tuple[bytes, ...] = _STDERR_NOISE) -> Iterator[None]:
    """Leave out the lines holding one of `noise` from everything written to file descriptor 2
    meanwhile (C++ code and forwarded worker lines included); the rest passes at once, partial
    lines (progress bars) too. Only where sys.stderr is file descriptor 2 (not in a host that
    captures stderr itself). What the process wrote before the end has passed when it ends."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd != 2:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    flushed = threading.Event()

    def write(data: bytes) -> None:
        while data:
            data = data[os.write(saved, data):]

    def pump() -> None:
        midline = False  # the last byte passed on ended no line: what follows belongs to it
        try:
            while chunk := os.read(read_end, 1 << 16):
                *lines, tail = chunk.split(b"\n")
                out = []
                for line in lines:
                    if line.endswith(_FLUSHED):  # after what was written before the end
                        line = line[:-len(_FLUSHED)]
                        out.append(line)
                        midline = midline or bool(line)
                        flushed.set()
                        continue
                    if midline or not any(n in line for n in noise):
                        out.append(line + b"\n")
                    midline = False
                if tail:
                    out.append(tail)
                    midline = True
                write(b"".join(out))
        except OSError:  # the terminal went away: nothing left to show anything on
            pass

    threading.Thread(target=pump, name="panoray-stderr", daemon=True).start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.write(2, _FLUSHED + b"\n")
        flushed.wait(timeout=5)
        os.dup2(saved, 2)  # processes that inherited the pipe keep writing through the pump


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")  # never imported: not up (and no import of Ray to find out)
    return ray is not None and ray.is_initialized()


def _shut_down_own_ray() -> None:
    """Stop the Ray a command started, here rather than in Ray's atexit hook, with Ctrl-C held
    off while its processes are stopped: a Ctrl-C just as a job ends is not a traceback."""
    if not _ray_is_up():
        return
    import signal

    import ray

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:
        ray.shutdown()
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    ray_was_up = _ray_is_up()
    try:
        try:
            return int(args.func(args) or 0)
        finally:
            if not ray_was_up:
                _shut_down_own_ray()
    except KeyboardInterrupt:
        print("panoray: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - only user errors are caught, the rest re-raised
        user_error = isinstance(e, _user_errors()) or _is_unreachable_store(e) or (
            isinstance(e, ValueError) and _raised_by_validator(e))
        if not user_error:
            raise
        print(f"panoray {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
