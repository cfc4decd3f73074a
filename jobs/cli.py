"""The `panoray` command line. Each command is a thin shell over a function in pipeline/ or
jobs/; errors a user can make end with one sentence on stderr and exit status 2."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence

log = logging.getLogger("panoray")


class UserError(Exception):
    """An error the user can fix; printed as one sentence, no traceback."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that describe a user's mistake rather than a bug."""
    from jobs.spec import SpecError
    from pipeline.segment.commits import OutputLocked

    errors: list[type[BaseException]] = [UserError, SpecError, OutputLocked, FileNotFoundError,
                                         PermissionError]
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        errors += [NoCredentialsError, PartialCredentialsError]
    except ImportError:
        pass
    try:
        from model.bundle import BundleError  # bad format, config or weights (mismatch too)

        errors.append(BundleError)
    except ImportError:
        pass
    from pipeline.segment.predictor import PredictorError

    return (*errors, PredictorError)


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
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_segment)


def cmd_segment(args: argparse.Namespace) -> int:
    from pipeline.segment.job import run_segment

    params = _job_params("segment", args)
    summary = run_segment(params=params, progress=not args.no_progress)
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
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from pipeline.train.job import run_finetune

    params = _job_params("finetune", args)
    if "://" not in params.model and "/" not in params.model:
        _check_preset(params.model)
    result = run_finetune(params=params)
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
    p.add_argument("--train", type=int, default=200, help="train images")
    p.add_argument("--val", type=int, default=40, help="val images")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> int:
    from pipeline.coco.synth import make_synthetic_dataset

    summary = make_synthetic_dataset(args.dst, num_train=args.train, num_val=args.val,
                                     image_size=(args.size, args.size), seed=args.seed)
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
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from model.bundle import load_state_dict_into, save_bundle
    from model.mask2former import build_model
    from model.storage import shown_uri

    if args.fmt == "hf":
        from model.convert_hf import convert_hf

        config, state_dict = convert_hf(args.src)
    else:
        if not args.preset:
            raise UserError("a detectron2 .pkl holds no architecture: pass --preset, e.g. "
                            "--preset r50-coco-panoptic")
        from model.convert_detectron2 import convert_detectron2

        _check_preset(args.preset)
        config, state_dict = convert_detectron2(args.src, preset=args.preset)
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
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from pipeline.evaluate import format_pq_table, pq_compute
    from pipeline.segment.output import evaluate_output, results_json

    try:
        if args.pred.endswith(".json"):
            results = pq_compute(args.gt, args.pred, args.gt_folder, args.pred_folder, workers=1)
            text, doc = format_pq_table(results), json.dumps(results, indent=2, default=str)
        else:
            evaluation = evaluate_output(args.pred, args.gt, args.gt_folder)
            text, doc = evaluation.render(), results_json(evaluation)
    except KeyError as e:  # predictions and ground truth disagree (ids, categories)
        raise UserError(str(e.args[0] if e.args else e)) from None
    print(text)
    if args.out:
        from model.storage import get_filesystem

        fs, path = get_filesystem(args.out)
        fs.pipe_file(path, doc.encode())
    return 0


def _add_show(sub) -> None:
    p = sub.add_parser("show", help="overlay pictures + contact sheet from a segment output",
                       description="Draw the segments of up to --limit images of a segment "
                       "output over the original images, with class names and colours.")
    p.add_argument("output", help="segment output URI")
    p.add_argument("dst", help="folder/URI for the PNGs")
    p.add_argument("--model", help="bundle whose config.json names and colours the classes")
    p.add_argument("--categories", help="or a COCO JSON with categories")
    p.add_argument("--limit", type=int, default=16)
    p.set_defaults(func=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    from pipeline.segment.show import show

    summary = show(args.output, args.dst, model=args.model, categories=args.categories,
                   limit=args.limit)
    print(f"wrote {len(summary.written)} overlays and {summary.contact_sheet}")
    if summary.skipped:
        print(f"{len(summary.skipped)} original images could not be read; drawn on grey")
    return 0


def _add_submit(sub) -> None:
    p = sub.add_parser("submit", help="run a job spec on a running Ray cluster (Jobs API)",
                       description="Check SPEC locally, then submit it to the Ray cluster whose "
                       "dashboard is at --address; prints the submission id.")
    p.add_argument("spec", help="job spec YAML (kind: segment | finetune)")
    p.add_argument("--address", required=True, help="dashboard URL, e.g. http://HEAD:8265")
    p.add_argument("--wait", action="store_true", help="wait for the job and exit with its result")
    p.set_defaults(func=cmd_submit)


def cmd_submit(args: argparse.Namespace) -> int:
    from jobs.submit import submit

    try:
        job_id, status = submit(args.spec, address=args.address, wait=args.wait)
    except ConnectionError as e:
        raise UserError(f"cannot reach a Ray cluster at {args.address}: {e}") from None
    print(f"submitted {job_id} to {args.address}" + (f": {status}" if status else ""))
    print(f"follow it with: ray job logs --address {args.address} --follow {job_id}")
    return 0 if status in (None, "SUCCEEDED") else 1


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole product on synthetic data, in minutes",
                       description="Synthetic archive -> model -> segment on a local Ray -> PQ "
                       "-> overlays; prints where everything is.")
    p.add_argument("--out", default="demo-out", help="where everything goes (default demo-out)")
    p.add_argument("--train-steps", type=int, help="train tiny this many steps instead of "
                   "using the shipped demo bundle")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    run_demo(out=args.out, train_steps=args.train_steps)
    return 0


def _check_preset(name: str) -> None:
    from model.config import PRESETS

    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")


def build_parser(extra: Sequence[Callable] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="panoray",
        description="Mask2Former panoptic segmentation of image archives on Ray, and "
        "fine-tuning with the same model code.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_segment, _add_finetune, _add_evaluate, _add_show, _add_synth, _add_convert,
                _add_submit, _add_demo, *extra):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("panoray: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        from model.storage import redact

        message = redact(str(e).strip() or type(e).__name__).splitlines()[0]
        print(f"panoray {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
