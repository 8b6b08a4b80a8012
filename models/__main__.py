"""python -m models schema | python -m models build-tiny DIR"""

from __future__ import annotations

import json

import click

from config.cli import run


@click.group(help="The describe model: report schema and the tiny offline test model.")
def cli() -> None:
    pass


@cli.command(help="Print the report JSON Schema (schema v1).")
def schema() -> None:
    from models.schema import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@cli.command("build-tiny", help="Write a tiny random Qwen3-VL + processor to DIR (offline).")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
def build_tiny_cmd(directory: str, seed: int) -> None:
    from models.tiny import build_tiny

    out = build_tiny(directory, seed=seed)
    click.echo(f"tiny Qwen3-VL written to {out}")


if __name__ == "__main__":
    run(cli, "python -m models")
