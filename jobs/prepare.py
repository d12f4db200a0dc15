"""`python -m jobs.prepare {demo,index,import,transcode}`: get a dataset ready for training.

    demo       write the synthetic motion dataset (videos, train/val manifests, label map)
    import     turn Kinetics CSVs, PySlowFast lists, Something-Something v2 JSON or class folders into a manifest
    index      probe every video of a manifest on the Ray cluster and write the Parquet index training reads
    transcode  re-encode a manifest's videos on the Ray cluster (smaller, shorter GOPs) and write a new manifest

Every path may be a local path or a URI (`s3://bucket/...`): manifests, label maps, indexes and class folders are
read from and written to object storage as they are locally. Bad input ends with one line on stderr and the exit
code of its kind (see the README).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.cli import run_job
from pipeline import storage
from pipeline.data.demo import make_demo_dataset
from pipeline.data.importers import Imported, import_folders, import_kinetics, import_pyslowfast, import_ssv2
from pipeline.data.manifest import (
    ManifestError,
    label_map_path,
    read_label_map,
    read_manifest,
    write_label_map,
    write_manifest,
)
from pipeline.errors import ConfigError, DataError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def prepare() -> int:
        try:
            return args.command(args)
        except OSError as error:  # a folder that can't be written, a file that can't be read
            raise DataError(f"{error.filename}: {error.strerror}") from None

    return run_job("jobs.prepare", prepare)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True, metavar="{demo,index,import,transcode}")

    demo = commands.add_parser("demo", help="write the synthetic motion dataset")
    demo.add_argument("--out", type=Path, required=True, help="folder to write")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--classes", type=int, default=8, help="number of motion classes, at most 8 (default: 8)")
    demo.add_argument("--videos-per-class", type=int, default=40, help="(default: 40)")
    demo.add_argument("--size", type=int, default=80, help="frame side in pixels (default: 80)")
    demo.add_argument("--frames", type=int, default=40, help="frames per video (default: 40)")
    demo.add_argument("--fps", type=int, default=30, help="(default: 30)")
    demo.set_defaults(command=_demo)

    index = commands.add_parser("index", help="probe a manifest's videos into a Parquet index, on Ray")
    index.add_argument("--manifest", required=True, help="a path or a URI (s3://...), as every path here")
    index.add_argument("--out", required=True, help="index file to write (.parquet)")
    index.add_argument("--root", help="where relative paths start (default: the manifest's folder)")
    index.add_argument("--allow-outside-root", action="store_true", help="accept paths that leave the root")
    index.add_argument("--labels", help="label map for class names (default: labels.txt beside it)")
    index.add_argument("--cpus-per-task", type=float, default=1.0, help="(default: 1)")
    index.add_argument("--concurrency", type=int, help="most probe tasks at once (default: as many as fit)")
    index.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)")
    index.set_defaults(command=_index)

    _add_transcode(commands)

    importer = commands.add_parser("import", help="write a manifest and label map from another format")
    formats = importer.add_subparsers(required=True, metavar="{kinetics,pyslowfast,ssv2,folders}")
    kinetics = formats.add_parser("kinetics", help="a Kinetics CSV: label,youtube_id,time_start,time_end,split")
    kinetics.add_argument("--csv", required=True)
    kinetics.add_argument("--labels", help="class names, one a line (default: the CSV's labels sorted)")
    kinetics.add_argument("--suffix", default=".mp4", help="video file suffix (default: .mp4)")
    kinetics.set_defaults(
        command=_import, read=lambda a: import_kinetics(a.csv, names=_names(a.labels), suffix=a.suffix)
    )
    pyslowfast = formats.add_parser("pyslowfast", help="a PySlowFast list: `path label` per line")
    pyslowfast.add_argument("--list", required=True)
    pyslowfast.add_argument("--labels", help="class names, one a line (default: 0, 1, ...)")
    pyslowfast.set_defaults(command=_import, read=lambda a: import_pyslowfast(a.list, names=_names(a.labels)))
    ssv2 = formats.add_parser("ssv2", help="Something-Something v2 annotations and label JSON")
    ssv2.add_argument("--annotations", required=True, help="e.g. something-something-v2-train.json")
    ssv2.add_argument("--labels-json", required=True, help="something-something-v2-labels.json")
    ssv2.add_argument("--suffix", default=".webm", help="video file suffix (default: .webm)")
    ssv2.set_defaults(command=_import, read=lambda a: import_ssv2(a.annotations, a.labels_json, suffix=a.suffix))
    folders = formats.add_parser("folders", help="one folder of videos per class")
    folders.add_argument("--root", required=True, help="the folder (or bucket prefix) holding the class folders")
    folders.add_argument("--labels", help="class names, one a line (default: the folder names sorted)")
    folders.set_defaults(
        command=_import,
        read=lambda a: import_folders(a.root, names=_names(a.labels), manifest_dir=storage.parent(a.out)),
    )
    for command in (kinetics, pyslowfast, ssv2, folders):
        command.add_argument("--out", required=True, help="manifest to write (.parquet or .csv)")
    return parser


def _add_transcode(commands: argparse._SubParsersAction) -> None:
    transcode = commands.add_parser("transcode", help="re-encode a manifest's videos for fast decoding, on Ray")
    transcode.add_argument("--manifest", required=True, help="(a local path: transcode reads and writes no URIs)")
    transcode.add_argument("--out", required=True, help="folder for the videos and the new manifest")
    transcode.add_argument("--root", help="where relative paths start (default: the manifest's folder)")
    transcode.add_argument("--allow-outside-root", action="store_true", help="accept paths that leave the root")
    # the defaults are measured in BENCHMARKS.md ("Re-encoding")
    transcode.add_argument("--short-side", type=int, default=320, help="scale down to this short side (%(default)s)")
    transcode.add_argument("--gop", type=int, default=32, help="frames between keyframes at most (%(default)s)")
    transcode.add_argument("--crf", type=int, default=23, help="libx264 quality, lower is better (%(default)s)")
    transcode.add_argument("--preset", default="fast", help="libx264 encoder preset (%(default)s)")
    transcode.add_argument("--tune", default="fastdecode", help="libx264 tune, or none (%(default)s)")
    transcode.add_argument("--cpus-per-task", type=float, default=1.0, help="(default: 1)")
    transcode.add_argument("--concurrency", type=int, help="most encode tasks at once (default: as many as fit)")
    transcode.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)")
    transcode.set_defaults(command=_transcode)


def _demo(args: argparse.Namespace) -> int:
    demo = make_demo_dataset(
        args.out,
        seed=args.seed,
        num_classes=args.classes,
        videos_per_class=args.videos_per_class,
        size=args.size,
        num_frames=args.frames,
        fps=args.fps,
    )
    print(f"wrote {demo.train_manifest}, {demo.val_manifest} and {demo.label_map}")
    return 0


def _index(args: argparse.Namespace) -> int:
    from pipeline.cluster import connect
    from pipeline.data.index import build_index, read_usable, require_usable

    # refuse a bad manifest before starting Ray
    read_manifest(args.manifest, args.root, args.allow_outside_root, args.labels)
    connect(args.address, None)
    summary = build_index(
        args.manifest,
        args.out,
        args.root,
        allow_outside_root=args.allow_outside_root,
        labels=args.labels,
        cpus_per_task=args.cpus_per_task,
        concurrency=args.concurrency,
    )
    print(
        f"indexed {summary.total} videos into {storage.redact(summary.path)}: {summary.usable} usable, "
        f"{len(summary.unusable)} left out"
    )
    for path, reason in summary.unusable:
        print(f"  left out {path}: {reason}")
    require_usable(*read_usable(summary.path), str(args.manifest))
    return 0


def _transcode(args: argparse.Namespace) -> int:
    from pipeline.cluster import connect
    from pipeline.data.transcode import EncodeSettings, plan_transcode, transcode_manifest

    given = [str(value) for value in (args.manifest, args.out, args.root) if value is not None]
    if any(storage.is_uri(value) for value in given):
        raise ConfigError(
            "transcode reads and writes local paths only (a shared file system); for videos in a bucket, run it "
            "where they are mounted or copied, then upload its --out folder"
        )
    tune = "" if args.tune == "none" else args.tune
    settings = EncodeSettings(args.short_side, args.gop, args.crf, args.preset, tune)
    plan_transcode(args.manifest, args.out, args.root, args.allow_outside_root)  # refuse a bad plan before Ray
    connect(args.address, None)
    summary = transcode_manifest(
        args.manifest,
        args.out,
        settings,
        args.root,
        allow_outside_root=args.allow_outside_root,
        cpus_per_task=args.cpus_per_task,
        concurrency=args.concurrency,
    )
    print(
        f"re-encoded {summary.encoded} of {summary.videos} videos ({summary.reused} already done, "
        f"{len(summary.failed)} failed), {summary.bytes_in / 1e6:.1f} MB -> {summary.bytes_out / 1e6:.1f} MB; "
        f"wrote {summary.rows_written} of {summary.rows} rows to {summary.manifest}"
    )
    for path, reason in summary.failed:
        print(f"  failed {path}: {reason}")
    if summary.failed:
        print(f"  (listed in {summary.failed_list})")
    return 0


def _import(args: argparse.Namespace) -> int:
    imported: Imported = args.read(args)
    labels = label_map_path(args.out)
    if storage.exists(labels) and read_label_map(labels) != imported.names:
        raise ManifestError(
            f"{storage.redact(labels)} already holds different class names; write this manifest elsewhere or pass "
            "--labels"
        )
    write_manifest(imported.table, args.out)
    write_label_map(imported.names, labels)
    shown = storage.redact(args.out), storage.redact(labels)
    print(f"wrote {imported.table.num_rows} videos of {len(imported.names)} classes to {shown[0]} and {shown[1]}")
    if imported.root is not None:
        root = storage.redact(imported.root)
        print(f"its paths start at {root}: index it with --root {root}, train with data.root=...")
    return 0


def _names(path: str | None) -> list[str] | None:
    return read_label_map(path) if path is not None else None


if __name__ == "__main__":
    sys.exit(main())
