"""``hamil <stage>``: one subcommand per pipeline stage. Bad input ends with one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hamil.errors import TrainingDiverged
from preprocessing.errors import InputError

log = logging.getLogger("hamil")


def _dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """Add one ``--field-name`` option per dataclass field, typed from its annotation."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, nargs = _arg_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        else:
            group.add_argument(
                flag, type=kind, nargs=nargs, default=argparse.SUPPRESS, metavar=f.name.upper()
            )


def _arg_type(hint: Any) -> tuple[Callable[[str], Any], str | None]:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kind, nargs = _arg_type(args[0])
        if type(None) in typing.get_args(hint) and kind is not bool:
            return _or_none(kind), nargs  # "none" on the command line gives None
        return kind, nargs
    if typing.get_origin(hint) is tuple:
        return args[0], "+"
    if typing.get_origin(hint) is dict:
        return json.loads, None
    return hint, None


def _or_none(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in its errors
    return parse


def _dataclass_from(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**{**values, **extra})


def cmd_synth(args: argparse.Namespace) -> None:
    from preprocessing.sources.synthetic import SynthParams, generate

    table = generate(args.out, _dataclass_from(SynthParams, args), workers=args.workers)
    log.info("wrote %d fields of %d proteins to %s", len(table), table["group"].nunique(), args.out)


def cmd_download(args: argparse.Namespace) -> None:
    if args.source == "folder":
        from preprocessing.sources.folder import prepare_folder

        if not args.table:
            raise InputError("hamil download folder: --table (path, group, labels) is required")
        table = prepare_folder(args.table, args.out, args.image_root, args.max_bad_fraction, args.workers)
        log.info(
            "folder: %d images of %d groups -> %s/images.tsv", len(table), table["group"].nunique(), args.out
        )
        return
    import importlib

    module = importlib.import_module(f"preprocessing.sources.{args.source}")
    options_cls = next(
        v for k, v in vars(module).items() if k.endswith("Options") and dataclasses.is_dataclass(v)
    )
    table = module.acquire(Path(args.out), _options_from_json(options_cls, args.options), limit=args.limit)
    log.info(
        "%s: %d images of %d groups -> %s/images.tsv",
        args.source,
        len(table),
        table["group"].nunique(),
        args.out,
    )


def _options_from_json(cls: type, text: str) -> Any:
    """A source's options dataclass from a JSON object; unknown keys are named; lists become tuples."""
    try:
        values = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise InputError(f"--options is not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise InputError("--options must be a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(
            f"unknown {cls.__name__} option(s): {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value)
        elif isinstance(value, str) and Path in typing.get_args(hints[key]):
            values[key] = Path(value)
    return cls(**values)


def cmd_crop(args: argparse.Namespace) -> None:
    from preprocessing.crop import CropParams, crop_shard

    stats = crop_shard(
        Path(args.images),
        args.shard,
        args.num_shards,
        Path(args.out_zarr),
        Path(args.out_tsv),
        _dataclass_from(CropParams, args),
        workers=args.workers,
        boxes_tsv=Path(args.boxes) if args.boxes else None,
        max_bad_fraction=args.max_bad_fraction,
    )
    log.info("crop shard %d/%d: %s", args.shard, args.num_shards, stats)


def cmd_bags(args: argparse.Namespace) -> None:
    from preprocessing.bags import BagParams, build_bags

    stats = build_bags(
        args.tables,
        args.stores,
        args.out_store,
        args.out_table,
        _dataclass_from(BagParams, args),
        source=args.source,
        workers=args.workers,
    )
    log.info("bags: %s", stats)


def cmd_train(args: argparse.Namespace) -> None:
    from hamil.config import TrainConfig
    from hamil.train import train

    best = train(_dataclass_from(TrainConfig, args), resume=args.resume)
    log.info("best validation: %s", best)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from hamil.evaluate import evaluate

    tune = None if args.tune_split == "none" else args.tune_split
    metrics = evaluate(
        args.checkpoint,
        args.store,
        args.out_dir,
        args.split,
        args.device,
        args.batch_bags,
        args.threshold,
        tune,
    )
    log.info(
        "%s: macro AUC %s, macro F1 %.4f, micro F1 %.4f",
        args.checkpoint,
        metrics["macro_auc"],
        metrics["macro_f1"],
        metrics["micro_f1"],
    )


def cmd_figures(args: argparse.Namespace) -> None:
    from hamil.run_figures import draw_run_figures

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    written = draw_run_figures(
        args.run_dir,
        args.store,
        args.split,
        args.compare_run,
        args.bags,
        args.instances,
        args.seed,
        args.title or str(args.run_dir),
        args.device,
        args.batch_bags,
    )
    log.info("figures: %s", ", ".join(str(p) for p in written))


def cmd_compare(args: argparse.Namespace) -> None:
    from hamil.compare import compare

    print(compare(args.metrics, args.out_tsv, args.out_md, title=args.title, reference=args.reference))


def cmd_predict(args: argparse.Namespace) -> None:
    from hamil.apply import predict_images

    out = predict_images(
        args.checkpoint,
        args.inputs,
        args.out,
        threshold=args.threshold,
        thresholds=args.thresholds,
        instance_scores=args.instance_scores,
        device=args.device,
        batch_bags=args.batch_bags,
    )
    log.info("predict: outputs in %s", out)


def cmd_mil_bench(args: argparse.Namespace) -> None:
    from hamil.mil_bench import run_mil_bench

    try:
        options = json.loads(args.model_options)
    except json.JSONDecodeError as err:
        raise InputError(f"--model-options is not valid JSON ({err})") from None
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise InputError(
            '--model-options must be a JSON object of objects, e.g. {"hamil": {"kernel_size": 3}}'
        )
    summary = run_mil_bench(
        args.input,
        args.out_dir,
        args.models,
        folds=args.folds,
        repeats=args.repeats,
        epochs=args.epochs,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        dropout=args.dropout,
        batch_bags=args.batch_bags,
        seed=args.seed,
        options=options,
        threads=args.threads,
    )
    print((Path(args.out_dir) / "summary.md").read_text(), end="")
    log.info("mil-bench: %d models; tables in %s", len(summary), args.out_dir)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hamil`` command."""
    from hamil.config import TrainConfig
    from preprocessing.bags import BagParams
    from preprocessing.crop import CropParams
    from preprocessing.sources.synthetic import SynthParams

    parser = argparse.ArgumentParser(prog="hamil", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")

    p = sub.add_parser("synth", help="generate a synthetic HPA-like data set")
    p.add_argument("--out", required=True, help="output folder (images.tsv, boxes.tsv, images/)")
    p.add_argument("--workers", type=int, default=1)
    _dataclass_options(p, SynthParams)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("download", help="acquire a data source (hpa, hpa_paper, bdgp, or your own folder)")
    p.add_argument("source", choices=["hpa", "hpa_paper", "bdgp", "folder"])
    p.add_argument("--out", required=True, help="output folder (images.tsv is written there)")
    p.add_argument("--table", help="folder: TSV with path, group, labels (labels may be empty: negatives)")
    p.add_argument("--image-root", help="folder: base of relative paths (default: the table's folder)")
    p.add_argument(
        "--max-bad-fraction", type=float, default=0.0, help="folder: skip up to this many bad images"
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--limit", type=int, help="hpa, hpa_paper, bdgp: only the first N groups (a quick try)")
    p.add_argument("--options", default="{}", help="hpa, hpa_paper, bdgp: source options as a JSON object")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("crop", help="cut cell patches from one shard of images.tsv")
    p.add_argument("--images", required=True, help="images.tsv")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--out-zarr", required=True)
    p.add_argument("--out-tsv", required=True)
    p.add_argument("--boxes", help="true cell boxes (boxes.tsv) to report crop recall")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-bad-fraction", type=float, default=0.05)
    _dataclass_options(p, CropParams)
    p.set_defaults(func=cmd_crop)

    p = sub.add_parser("bags", help="build the bag store from all patch shards")
    p.add_argument("--tables", nargs="+", required=True, help="shard tables (<shard>.tsv)")
    p.add_argument("--stores", nargs="+", required=True, help="shard stores (<shard>.zarr), same order")
    p.add_argument("--out-store", required=True)
    p.add_argument("--out-table", required=True)
    p.add_argument("--source", default="unknown")
    p.add_argument("--workers", type=int, default=1)
    _dataclass_options(p, BagParams)
    p.set_defaults(func=cmd_bags)

    p = sub.add_parser("train", help="train one model with one seed")
    p.add_argument("--store", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out-dir>/last.pt when it exists (same configuration; exact on the CPU)",
    )
    _dataclass_options(p, TrainConfig, skip=("store", "out_dir"))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--threshold", type=float, default=0.5, help="fixed threshold (the paper's 0.5)")
    p.add_argument(
        "--tune-split",
        default="val",
        choices=["train", "val", "none"],
        help="also report per-class thresholds tuned for F1 on this split (default val)",
    )
    p.add_argument("--batch-bags", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("figures", help="draw the figures of a training run (PNG and SVG)")
    p.add_argument("--run-dir", required=True, help="results/<ds>/<model>/seed<k>")
    p.add_argument("--title", default="")
    p.add_argument("--store", help="the bag store: adds the tSNE and instance-score figures")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument(
        "--compare-run", nargs="*", default=[], help="other runs whose instance scores are shown beside"
    )
    p.add_argument("--bags", type=int, default=4, help="bags (rows) in the instance-score figure")
    p.add_argument("--instances", type=int, default=8, help="instances shown per bag at most")
    p.add_argument("--seed", type=int, default=0, help="tSNE and the choice of bags")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-bags", type=int, default=8, help="whole bags per forward pass")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all)")
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser("compare", help="gather metrics of all models and seeds into one table")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--out-tsv", required=True)
    p.add_argument("--out-md", required=True)
    p.add_argument("--title", default="")
    p.add_argument(
        "--reference", help="TSV of reference results (model, macro_auc, macro_f1, micro_f1, source)"
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("predict", help="predict labels for your own bags of images")
    p.add_argument("--checkpoint", required=True, help="a trained checkpoint (best.pt)")
    p.add_argument(
        "--inputs",
        required=True,
        help="a folder with one sub-folder of images per bag, or a TSV with columns bag and path",
    )
    p.add_argument("--out", required=True, help="output folder (predictions.tsv, skipped.tsv, instances.tsv)")
    p.add_argument("--threshold", type=float, default=0.5, help="one threshold for every class")
    p.add_argument(
        "--thresholds", help="per_class.tsv of hamil evaluate: use its tuned thresholds (threshold_tuned)"
    )
    p.add_argument(
        "--instance-scores", action="store_true", help="also write instances.tsv (box and score per instance)"
    )
    p.add_argument("--batch-bags", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "mil-bench", help="classical MIL benchmarks (MUSK, Fox, ...): repeated cross-validation"
    )
    p.add_argument(
        "--input",
        required=True,
        help="one instance per row: CSV label,bag,f1,... (no header; labels 0/1 or -1/1), "
        "or a TSV/CSV with a header naming bag and label (other columns: features)",
    )
    p.add_argument("--out-dir", required=True, help="output folder (summary.tsv, summary.md, folds.tsv)")
    p.add_argument(
        "--models",
        nargs="+",
        default=["hamil", "hamil_a", "attention", "gated_attention", "mean", "max"],
        help="aggregators from the model registry (default: the six of Table S3)",
    )
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5, help="cross-validation repeats with fold seeds seed+r")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4, help="SGD learning rate (paper: 1e-4)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.005)
    p.add_argument("--dropout", type=float, default=0.2, help="after each fc layer of the instance network")
    p.add_argument("--batch-bags", type=int, default=1, help="bags per SGD step (paper: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave torch's choice)")
    p.add_argument(
        "--model-options", default="{}", help='aggregator options as JSON, e.g. {"hamil": {"kernel_size": 3}}'
    )
    p.set_defaults(func=cmd_mil_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hamil`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except (InputError, FileNotFoundError, ValueError, TrainingDiverged) as err:
        print(f"hamil {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
