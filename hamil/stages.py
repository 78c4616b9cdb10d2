"""The pipeline's stages as data: for each ``hamil <stage>``, a help line, its parameter dataclasses and the
function that runs it with them.

Every field of a parameter dataclass is one command-line option (``--field-name``), with its help text from
the field's ``metadata["help"]`` and its default from the field itself; :mod:`hamil.cli` builds the parser
from :data:`STAGES` alone. The algorithm parameters that a stage records (``SynthParams``, ``CropParams``,
``BagParams``, ``TrainConfig``) are defined with the code that uses them; the job dataclasses here add the
paths, worker counts and devices of one invocation. Each class checks its values in ``__post_init__``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from hamil.config import TrainConfig, check_options, valid_device, valid_threads
from hamil.mil_synth import MilSynthParams
from preprocessing.bags import BagParams
from preprocessing.crop import CropParams
from preprocessing.errors import InputError
from preprocessing.io import DEFAULT_MAX_BAD_FRACTION, check_fraction
from preprocessing.options import opt, options_of
from preprocessing.sources.synthetic import SynthParams
from preprocessing.store import BagStore

log = logging.getLogger("hamil")

SPLITS = ("train", "val", "test")
#: ``hamil download`` sources that fetch from a host: module and options class (a JSON ``--options``).
DOWNLOAD_SOURCES: dict[str, tuple[str, str]] = {
    "hpa": ("preprocessing.sources.hpa", "HpaOptions"),
    "hpa_paper": ("preprocessing.sources.hpa_paper", "HpaPaperOptions"),
    "bdgp": ("preprocessing.sources.bdgp", "BdgpOptions"),
}


# ---- acquire, crop, bags ---------------------------------------------------------------------------------


@dataclass
class SynthJob:
    out: str = opt(help="output folder (images.tsv, boxes.tsv, images/)")
    workers: int = opt(1, "parallel processes rendering fields")

    def __post_init__(self) -> None:
        check_options({"workers": self.workers >= 1}, self)


@dataclass
class DownloadJob:
    source: str = opt(
        help="where the images come from", choices=(*DOWNLOAD_SOURCES, "folder"), positional=True
    )
    out: str = opt(help="output folder (images.tsv is written there)")
    max_bad_fraction: float = opt(
        DEFAULT_MAX_BAD_FRACTION,
        "images (genes, archives) that may fail (fraction) before the stage fails; listed in rejected.tsv",
    )
    table: str | None = opt(None, "folder: TSV with path, group, labels (labels may be empty: negatives)")
    image_root: str | None = opt(None, "folder: base of relative paths (default: the table's folder)")
    limit: int | None = opt(None, "hpa, hpa_paper, bdgp: only the first N groups (a quick try)")
    options: dict[str, Any] = opt({}, "hpa, hpa_paper, bdgp: the source's options as a JSON object")
    retries: int = opt(5, "hpa, hpa_paper, bdgp: attempts after the first for transient failures (back-off)")
    workers: int = opt(1, "parallel processes checking images (folder)")
    read: dict[str, Any] = opt(
        {}, "folder: which planes the model gets, as a JSON object (channels, z, time, scene, intensity)"
    )

    def __post_init__(self) -> None:
        check_fraction(self.max_bad_fraction)
        if self.read and self.source != "folder":
            raise InputError(f"hamil download {self.source}: --read is for the folder source (own files)")
        if self.read:
            from preprocessing.microscopy import ReadParams

            ReadParams.from_dict(self.read)  # one line for a bad read block, before any image is opened
        check_options({"workers": self.workers >= 1, "retries": self.retries >= 0}, self)
        if self.source == "folder" and not self.table:
            raise InputError("hamil download folder: --table (path, group, labels) is required")


@dataclass
class CropJob:
    images: str = opt(help="images.tsv of the acquire stage")
    out_zarr: str = opt(help="the shard's patch store (<shard>.zarr)")
    out_tsv: str = opt(help="the shard's patch table (<shard>.tsv)")
    shard: int = opt(0, "which shard of images.tsv to crop (0-based)")
    num_shards: int = opt(1, "into how many shards images.tsv is cut")
    boxes: str | None = opt(None, "true cell boxes (boxes.tsv) to report crop recall")
    max_bad_fraction: float = opt(
        DEFAULT_MAX_BAD_FRACTION, "unreadable images (fraction) allowed before the stage fails"
    )
    workers: int = opt(1, "parallel processes")

    def __post_init__(self) -> None:
        check_options(
            {
                "shard": 0 <= self.shard < max(self.num_shards, 1),
                "num_shards": self.num_shards >= 1,
                "workers": self.workers >= 1,
            },
            self,
        )
        check_fraction(self.max_bad_fraction)


@dataclass
class CropPreviewJob:
    fields: list[str] = opt(
        help="image files, or images.tsv tables (their rows in order)", positional=True, nargs="+"
    )
    out: str = opt("crop_preview.png", "the figure (PNG): kept boxes drawn on each field")
    max_fields: int = opt(6, "draw at most this many fields (the first ones)")

    def __post_init__(self) -> None:
        check_options({"max_fields": self.max_fields >= 1}, self)


@dataclass
class BagsJob:
    tables: list[str] = opt(help="shard tables (<shard>.tsv)")
    stores: list[str] = opt(help="shard stores (<shard>.zarr), in the order of --tables")
    out_store: str = opt(help="the bag store to write (<ds>.zarr)")
    out_table: str = opt(help="one row per bag (bags.tsv)")
    source: str = opt("unknown", "the data source's name, recorded in the store")
    workers: int = opt(1, "parallel chunk copies")
    paper_counts: str | None = opt(
        None, "TSV of published counts (split, bags, instances; e.g. the paper's Table S1) shown beside ours"
    )

    def __post_init__(self) -> None:
        if len(self.tables) != len(self.stores):
            raise InputError(f"--tables has {len(self.tables)} entries, --stores {len(self.stores)}")


def run_synth(job: SynthJob, params: SynthParams) -> None:
    from preprocessing.sources.synthetic import generate

    table = generate(job.out, params, workers=job.workers)
    log.info("wrote %d fields of %d proteins to %s", len(table), table["group"].nunique(), job.out)


def run_download(job: DownloadJob) -> None:
    out = Path(job.out)
    if job.source == "folder":
        from preprocessing.sources.folder import prepare_folder

        table = prepare_folder(
            table=job.table,
            out_dir=out,
            image_root=job.image_root,
            max_bad_fraction=job.max_bad_fraction,
            workers=job.workers,
            read=job.read,
        )
    else:
        module_name, options_name = DOWNLOAD_SOURCES[job.source]
        module = importlib.import_module(module_name)
        table = module.acquire(
            out_dir=out,
            options=options_of(getattr(module, options_name), job.options),
            limit=job.limit,
            max_bad_fraction=job.max_bad_fraction,
            retries=job.retries,
        )
    log.info(
        "%s: %d images of %d groups -> %s/images.tsv", job.source, len(table), table["group"].nunique(), out
    )


def run_crop(job: CropJob, params: CropParams) -> None:
    from preprocessing.crop import crop_shard

    stats = crop_shard(
        images_tsv=Path(job.images),
        shard=job.shard,
        num_shards=job.num_shards,
        out_zarr=Path(job.out_zarr),
        out_tsv=Path(job.out_tsv),
        params=params,
        workers=job.workers,
        boxes_tsv=Path(job.boxes) if job.boxes else None,
        max_bad_fraction=job.max_bad_fraction,
    )
    log.info("crop shard %d/%d: %s", job.shard, job.num_shards, stats)


def run_crop_preview(job: CropPreviewJob, params: CropParams) -> None:
    from preprocessing.preview import preview_crop

    counts = preview_crop(job.fields, params, job.out, max_fields=job.max_fields)
    log.info("crop preview (%s): %s -> %s", params.backend, counts, job.out)


def run_bags(job: BagsJob, params: BagParams) -> None:
    from preprocessing.bags import build_bags

    stats = build_bags(
        shard_tables=job.tables,
        shard_stores=job.stores,
        dest_store=job.out_store,
        dest_table=job.out_table,
        params=params,
        source=job.source,
        workers=job.workers,
    )
    if job.paper_counts:
        stats = compare_counts(stats, job.paper_counts, Path(job.out_table).with_name("bags.json"))
    log.info("bags: %s", stats)


def compare_counts(stats: dict[str, Any], paper_counts: str, bags_json: Path) -> dict[str, Any]:
    """Add the published bag and instance counts per split (and ours as a fraction of them) to the bag
    stage's statistics, rewrite ``bags.json``, and log the comparison."""
    from preprocessing.io import read_table, write_json

    table = read_table(paper_counts, ["split", "bags", "instances"]).set_index("split")
    paper = {}
    for split in ("train", "val", "test"):
        if split not in table.index:
            raise InputError(f"{paper_counts}: no row for the {split} split")
        bags, instances = (int(table.loc[split, c]) for c in ("bags", "instances"))
        ours_bags, ours_instances = stats["bags_per_split"][split], stats["instances_per_split"][split]
        paper[split] = {
            "bags": bags,
            "instances": instances,
            "ours_over_paper_bags": round(ours_bags / bags, 4) if bags else None,
            "ours_over_paper_instances": round(ours_instances / instances, 4) if instances else None,
        }
        log.info(
            "%s split: %d bags, %d instances (published: %d, %d)",
            split,
            ours_bags,
            ours_instances,
            bags,
            instances,
        )
    stats = {**stats, "published_counts": {"file": str(paper_counts), **paper}}
    write_json(stats, bags_json)
    return stats


# ---- train, evaluate, figures, compare, predict, mil-bench -----------------------------------------------


VERIFY_HELP = "first check every patch chunk of the store against the SHA-256 recorded when it was written"


@dataclass
class TrainJob:
    resume: bool = opt(
        False, "continue from <out-dir>/last.pt when it exists (same configuration; exact on CPU)"
    )
    overwrite: bool = opt(False, "replace the run (best.pt, last.pt, history.csv) that --out-dir holds")
    verify: bool = opt(False, VERIFY_HELP)


@dataclass
class EvaluateParams:
    checkpoint: str = opt(help="a trained checkpoint (best.pt)")
    store: str = opt(help="the bag store it was trained on")
    out_dir: str = opt(help="output folder (metrics.json, per_class.tsv, predictions.tsv, instances.tsv)")
    split: str = opt("test", "the split to evaluate", choices=SPLITS)
    threshold: float = opt(0.5, "fixed decision threshold for every class (the paper's 0.5)")
    tune_split: str | None = opt(
        "val", "also report per-class thresholds tuned for F1 on this split (none: off)"
    )
    batch_bags: int = opt(8, "whole bags per forward pass")
    device: str = opt("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")
    threads: int | None = opt(None, "torch CPU threads (default: all cores)")
    verify: bool = opt(False, VERIFY_HELP)

    def __post_init__(self) -> None:
        check_options(
            {
                "tune_split": self.tune_split in (None, "train", "val"),
                "threshold": 0 <= self.threshold <= 1,
                "batch_bags": self.batch_bags >= 1,
                "threads": valid_threads(self.threads),
                "device": valid_device(self.device),
            },
            self,
        )


@dataclass
class FigureParams:
    run_dir: str = opt(help="a training run's folder, results/<ds>/<model>/seed<k>")
    title: str = opt("", "figure title prefix (default: the run folder)")
    store: str | None = opt(None, "the bag store: adds the tSNE and instance-score figures")
    split: str = opt("test", "the split the model is applied to", choices=SPLITS)
    compare_run: list[str] = opt([], "other runs whose instance scores are shown beside")
    bags: int = opt(4, "bags (rows) in the instance-score figure, drawn at random with the seed")
    instances: int = opt(
        8, "instances shown per bag at most: the highest- and lowest-scoring halves (all of a smaller bag)"
    )
    seed: int = opt(0, "seed of the tSNE and of the choice of bags (listed in instance_scores.tsv)")
    device: str = opt("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")
    batch_bags: int = opt(8, "whole bags per forward pass")
    threads: int | None = opt(None, "torch CPU threads (default: all cores)")

    def __post_init__(self) -> None:
        checks = {
            "bags": self.bags >= 1,
            "instances": self.instances >= 2,  # at least the highest and the lowest
            "batch_bags": self.batch_bags >= 1,
        }
        checks |= {"threads": valid_threads(self.threads), "device": valid_device(self.device)}
        check_options(checks, self)


@dataclass
class CompareParams:
    metrics: list[str] = opt(help="metrics.json files of all runs")
    out_tsv: str = opt(help="the comparison table (TSV)")
    out_md: str = opt(help="the comparison table (Markdown)")
    title: str = opt("", "title of the Markdown table")
    reference: str | None = opt(
        None, "TSV of reference results (model, macro_auc, macro_f1, micro_f1, source)"
    )


@dataclass
class PredictParams:
    checkpoint: str = opt(help="a trained checkpoint (best.pt)")
    inputs: str = opt(
        help="a folder with one sub-folder of images per bag, or a TSV with path and bag or group "
        "(the training table: path, group, labels[, split]; with labels, metrics are written)"
    )
    out: str = opt(
        help="output folder (predictions.tsv, skipped.tsv, instances.tsv; metrics.json, per_class.tsv "
        "when the table has labels)"
    )
    threshold: float = opt(0.5, "one threshold for every class (predicted_labels, metrics)")
    thresholds: str | None = opt(
        None, "per_class.tsv of hamil evaluate: its tuned thresholds also give predicted_labels_tuned"
    )
    split: str | None = opt(
        None, "score only the table's rows whose split column holds this value", choices=SPLITS
    )
    instance_scores: bool = opt(False, "also write instances.tsv (image, box and score per instance)")
    batch_bags: int = opt(8, "whole bags per forward pass")
    device: str = opt("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")

    def __post_init__(self) -> None:
        checks = {"threshold": 0 <= self.threshold <= 1, "batch_bags": self.batch_bags >= 1}
        check_options({**checks, "device": valid_device(self.device)}, self)


@dataclass
class MilBenchParams:
    input: str = opt(
        help="one instance per row: CSV label,bag,f1,... (no header; labels 0/1 or -1/1), "
        "or a TSV/CSV with a header naming bag and label (other columns: features)"
    )
    out_dir: str = opt(help="output folder (summary.tsv, summary.md, folds.tsv)")
    models: list[str] = opt(
        ["hamil", "hamil_a", "attention", "gated_attention", "mean", "max"],
        "aggregators from the model registry (default: the six of Table S3)",
    )
    folds: int = opt(10, "cross-validation folds")
    repeats: int = opt(5, "cross-validation repeats with fold seeds seed+r")
    recipe: str | None = opt(
        None,
        "training recipe for all models (config/reference/recipes.yaml: paper, ilse2018; "
        "default: each model its own published recipe)",
    )
    epochs: int | None = opt(None, "training epochs per fold (default: from the recipe)")
    lr: float | None = opt(None, "learning rate (default: from the recipe; paper: 1e-4)")
    momentum: float | None = opt(None, "SGD momentum (default: from the recipe)")
    weight_decay: float | None = opt(None, "weight decay (default: from the recipe)")
    dropout: float | None = opt(
        None, "after each fc layer of the instance network (default: from the recipe)"
    )
    batch_bags: int | None = opt(None, "bags per optimizer step (default: from the recipe; paper: 1)")
    seed: int = opt(0, "seed of folds and initialisation")
    threads: int | None = opt(None, "torch threads per fold (default 1; results depend on it)")
    model_options: dict[str, Any] = opt({}, 'aggregator options as JSON, e.g. {"hamil": {"kernel_size": 3}}')
    dataset: str | None = opt(
        None,
        "classical set whose published results to print beside ours: musk1, musk2, fox, tiger, elephant "
        "(default: recognised from the input file's name)",
    )
    jobs: int = opt(0, "folds run in parallel processes (0: all cores; 1: serial, in this process)")

    def __post_init__(self) -> None:
        check_options(
            {
                "folds": self.folds >= 2,
                "repeats": self.repeats >= 1,
                "epochs": self.epochs is None or self.epochs >= 1,
                "lr": self.lr is None or self.lr > 0,
                "momentum": self.momentum is None or 0 <= self.momentum < 1,
                "weight_decay": self.weight_decay is None or self.weight_decay >= 0,
                "batch_bags": self.batch_bags is None or self.batch_bags >= 1,
                "dropout": self.dropout is None or 0 <= self.dropout < 1,
                "threads": valid_threads(self.threads),
                "jobs": self.jobs >= 0,
            },
            self,
        )
        if not all(isinstance(v, dict) for v in self.model_options.values()):
            raise InputError(
                '--model-options must be a JSON object of objects, e.g. {"hamil": {"kernel_size": 3}}'
            )


def _verify_store(path: str) -> None:
    """``--verify``: every patch chunk file of the store against the SHA-256 recorded when written."""
    BagStore(path, verify=True)
    log.info("%s: every patch chunk as written", path)


def run_train(cfg: TrainConfig, job: TrainJob) -> None:
    from hamil.train import train

    if job.verify:
        _verify_store(cfg.store)
    log.info("best validation: %s", train(cfg, resume=job.resume, overwrite=job.overwrite))


def run_evaluate(p: EvaluateParams) -> None:
    from hamil.evaluate import evaluate
    from hamil.runtime import set_threads

    set_threads(p.threads)
    if p.verify:
        _verify_store(p.store)
    metrics = evaluate(
        checkpoint=p.checkpoint,
        store_path=p.store,
        out_dir=p.out_dir,
        split=p.split,
        device=p.device,
        batch_bags=p.batch_bags,
        threshold=p.threshold,
        tune_split=p.tune_split,
    )
    log.info(
        "%s: macro AUC %s, macro F1 %.4f, micro F1 %.4f",
        p.checkpoint,
        metrics["macro_auc"],
        metrics["macro_f1"],
        metrics["micro_f1"],
    )


def run_figures(p: FigureParams) -> None:
    from hamil.figures import draw_run_figures
    from hamil.runtime import set_threads

    set_threads(p.threads)
    written = draw_run_figures(
        run_dir=p.run_dir,
        store_path=p.store,
        split=p.split,
        compare_runs=p.compare_run,
        bags_shown=p.bags,
        instances_shown=p.instances,
        seed=p.seed,
        title=p.title or str(p.run_dir),
        device=p.device,
        batch_bags=p.batch_bags,
    )
    log.info("figures: %s", ", ".join(str(path) for path in written))


def run_compare(p: CompareParams) -> None:
    from hamil.compare import compare

    print(compare(paths=p.metrics, out_tsv=p.out_tsv, out_md=p.out_md, title=p.title, reference=p.reference))


def run_predict(p: PredictParams) -> None:
    from hamil.predict import predict_images

    out = predict_images(
        checkpoint=p.checkpoint,
        inputs=p.inputs,
        out_dir=p.out,
        threshold=p.threshold,
        thresholds=p.thresholds,
        split=p.split,
        instance_scores=p.instance_scores,
        device=p.device,
        batch_bags=p.batch_bags,
    )
    log.info("predict: outputs in %s", out)


def run_mil_bench(p: MilBenchParams) -> None:
    from hamil import mil_bench

    cv = {k: getattr(p, k) for k in ("folds", "repeats", "epochs", "lr", "momentum", "weight_decay")}
    cv |= {"dropout": p.dropout, "batch_bags": p.batch_bags, "seed": p.seed, "threads": p.threads}
    cv |= {"jobs": p.jobs, "recipe": p.recipe}
    if p.recipe is not None:
        from hamil.recipes import get_recipe

        get_recipe(p.recipe)  # an unknown recipe is one line, before reading the input
    summary = mil_bench.run_mil_bench(
        path=p.input, out_dir=p.out_dir, models=p.models, options=p.model_options, dataset=p.dataset, **cv
    )
    print((Path(p.out_dir) / "summary.md").read_text(), end="")
    log.info("mil-bench: %d models; tables in %s", len(summary), p.out_dir)


@dataclass
class MilSynthJob:
    out: str = opt(help="output CSV (label,bag,f1,... rows, no header), e.g. data/mil/synthetic.csv")


def run_mil_synth(job: MilSynthJob, params: MilSynthParams) -> None:
    from hamil.mil_synth import write_mil_csv

    log.info("mil-synth: %s written to %s", write_mil_csv(job.out, params), job.out)


class Stage(NamedTuple):
    """One ``hamil <stage>``: its help line, its parameter dataclasses, and the function taking them."""

    help: str
    params: tuple[type, ...]
    run: Callable[..., None]


STAGES: dict[str, Stage] = {
    "synth": Stage("generate a synthetic HPA-like data set", (SynthJob, SynthParams), run_synth),
    "download": Stage(
        "acquire a data source (hpa, hpa_paper, bdgp, or your own folder)", (DownloadJob,), run_download
    ),
    "crop": Stage("cut cell patches from one shard of images.tsv", (CropJob, CropParams), run_crop),
    "crop-preview": Stage(
        "draw the boxes the crop keeps on a few fields (check the crop before a whole data set)",
        (CropPreviewJob, CropParams),
        run_crop_preview,
    ),
    "bags": Stage("build the bag store from all patch shards", (BagsJob, BagParams), run_bags),
    "train": Stage("train one model with one seed", (TrainConfig, TrainJob), run_train),
    "evaluate": Stage("evaluate a checkpoint on a split", (EvaluateParams,), run_evaluate),
    "figures": Stage("draw the figures of a training run (PNG and SVG)", (FigureParams,), run_figures),
    "compare": Stage("gather metrics of all models and seeds into one table", (CompareParams,), run_compare),
    "predict": Stage("predict labels for your own bags of images", (PredictParams,), run_predict),
    "mil-synth": Stage(
        "write a synthetic classical-MIL set (bags of feature vectors) for mil-bench",
        (MilSynthJob, MilSynthParams),
        run_mil_synth,
    ),
    "mil-bench": Stage(
        "classical MIL benchmarks (MUSK, Fox, ...): repeated cross-validation",
        (MilBenchParams,),
        run_mil_bench,
    ),
}
