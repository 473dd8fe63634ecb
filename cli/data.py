"""The ``clip21mpi data`` commands: convert a LibSVM file, describe a dataset."""

from __future__ import annotations

import shlex
import sys

import click
import numpy as np

from problems.data import DataError
from problems.sharded import (
    BLOCK_BYTES,
    COMPRESSIONS,
    client_label_counts,
    convert_libsvm,
    summarise,
)
from problems.split import SPLITS, client_offsets, row_order

# Up to this many clients, info shows every client's label counts.
CLIENT_TABLE_MAX = 20
# Up to this many label values, each gets a line and a column.
LABELS_SHOWN_MAX = 10
PROVENANCE_KEYS = (
    "name",
    "source",
    "source_size",
    "source_sha256",
    "source_index_base",
    "compression",
    "converter_version",
    "created",
    "command",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def data():
    """Convert and describe datasets.

    A converted dataset (an HDF5 file) lets every rank read only its own
    clients' rows: pass it to ``clip21mpi run --data``.
    """


def _command_line() -> str:
    argv = click.get_current_context().find_root().obj or {}
    return shlex.join(argv.get("argv") or sys.argv)


@data.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@click.option(
    "--compression",
    type=click.Choice(COMPRESSIONS),
    default="none",
    show_default=True,
    help="Compression of the stored arrays (smaller files, slower reads).",
)
@click.option(
    "--block-mb",
    type=click.IntRange(min=1),
    default=BLOCK_BYTES >> 20,
    show_default=True,
    help="MiB of text parsed at a time; memory use is about six times this.",
)
def convert(file, out, overwrite, compression, block_mb):
    """Convert the LibSVM FILE (.gz, .bz2 too) into OUT, read in parts by ranks.

    OUT holds the rows as chunked CSR arrays, the labels, and where they
    came from (path, size and sha256 of FILE, version, time, command).
    """
    try:
        dataset = convert_libsvm(
            file,
            out,
            overwrite=overwrite,
            compression=compression,
            block_bytes=block_mb << 20,
            command=_command_line(),
        )
    except (DataError, FileExistsError) as err:
        raise click.UsageError(str(err)) from err
    click.echo(
        f"{out}: {dataset.n_rows} rows, {dataset.n_features} features, "
        f"{dataset.nnz} nonzeros, {dataset.label_values.size} label values"
    )


@data.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option(
    "--clients",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Number of clients to split the rows over.",
)
@click.option(
    "--split",
    type=click.Choice(SPLITS),
    default="contiguous",
    show_default=True,
    help="Rows to clients, as in 'clip21mpi run'.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the shuffled split.",
)
def info(path, clients, split, seed):
    """Describe PATH, a LibSVM file or a converted dataset, and its client split."""
    try:
        summary = summarise(path)
    except DataError as err:
        raise click.UsageError(str(err)) from err
    if clients > summary.n_rows:
        raise click.BadParameter(
            f"{clients} exceeds the {summary.n_rows} rows of {path}; every client "
            "needs a row",
            param_hint="'--clients'",
        )
    click.echo("\n".join(_describe(summary, clients, split, seed)))


def _describe(summary, n_clients: int, split: str, seed: int) -> list[str]:
    """Return the lines that ``info`` prints."""
    n, d, nnz = summary.n_rows, summary.n_features, summary.nnz
    lines = [
        f"{summary.path}: {summary.kind}",
        f"rows:      {n}",
        f"features:  {d}",
        f"nnz:       {nnz} ({nnz / n:.2f} per row)",
        f"density:   {nnz / (n * d):.4g}",
    ]

    values, counts = np.unique(summary.labels, return_counts=True)
    lines.append(f"labels:    {values.size} value{'s' if values.size > 1 else ''}")
    names = [f"{v:g}" for v in values]
    width = max(len(s) for s in names[:LABELS_SHOWN_MAX])
    for name, count in list(zip(names, counts))[:LABELS_SHOWN_MAX]:
        lines.append(f"  {name:<{width}}  {count} rows ({100 * count / n:.1f}%)")
    if values.size > LABELS_SHOWN_MAX:
        lines.append(f"  ... and {values.size - LABELS_SHOWN_MAX} more")

    order = row_order(split, summary.labels, seed)
    offsets = client_offsets(n, n_clients)
    sizes = np.diff(offsets)
    how = f"{split}, seed {seed}" if split == "shuffled" else split
    lines.append(
        f"split:     {how}, {n_clients} client{'s' if n_clients > 1 else ''}, "
        f"rows per client min {sizes.min()}, median {np.median(sizes):g}, "
        f"max {sizes.max()}"
    )
    if n_clients <= CLIENT_TABLE_MAX:
        lines += _client_table(summary.labels, order, offsets)

    if summary.provenance is not None:
        lines.append("provenance:")
        keys = [k for k in PROVENANCE_KEYS if k in summary.provenance]
        width = max(len(k) for k in keys)
        for key in keys:
            lines.append(f"  {key:<{width}}  {summary.provenance[key]}")
    return lines


def _client_table(labels, order, offsets) -> list[str]:
    """Rows and label counts per client (distinct labels when there are many)."""
    values, counts = client_label_counts(labels, order, offsets)
    if values.size <= LABELS_SHOWN_MAX:
        header = ["client", "rows", *(f"{v:g}" for v in values)]
        table = [
            [str(i), str(row.sum()), *map(str, row)] for i, row in enumerate(counts)
        ]
    else:
        header = ["client", "rows", "labels"]
        table = [
            [str(i), str(row.sum()), str(np.count_nonzero(row))]
            for i, row in enumerate(counts)
        ]
    widths = [max(len(r[c]) for r in (header, *table)) for c in range(len(header))]
    return [
        "  " + "  ".join(cell.rjust(w) for cell, w in zip(r, widths))
        for r in (header, *table)
    ]
