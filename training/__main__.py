"""python -m training submit --dataset D --name N [--base M] [--preset P] [--epochs ...]
python -m training worker [--loglevel L]
python -m training status [NAME] [--format table|json]
python -m training cancel NAME
python -m training export --where "risk_factor = high" OUT"""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from config.cli import run
from config.settings import load_settings
from training.recipe import DEFAULT_PRESET, PRESETS

console = Console(highlight=False, soft_wrap=True)


def _sessions(settings):
    from db.session import make_sessionmaker, open_store

    return make_sessionmaker(open_store(settings, wait_s=30))


@click.group(help="QLoRA SFT runs on the train queue: submit, watch, cancel; export data.")
def cli() -> None:
    pass


@cli.command(help="Record a training run and queue it for a training worker.")
@click.option("--dataset", required=True, help="save_to_disk folder, .jsonl/.json or .parquet.")
@click.option("--name", required=True, help="The run's name; the adapter is registered by it.")
@click.option("--base", default=None, help="Base model (default FLEETSCRIBE_MODEL).")
@click.option(
    "--preset", type=click.Choice(list(PRESETS)), default=DEFAULT_PRESET, show_default=True
)
@click.option("--epochs", type=float, default=None)
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (overrides --epochs).")
@click.option("--lr", "learning_rate", type=float, default=None)
@click.option("--rank", "lora_rank", type=int, default=None)
@click.option("--alpha", "lora_alpha", type=int, default=None)
@click.option("--micro-batch", type=int, default=None)
@click.option("--grad-accum", type=int, default=None)
@click.option("--save-steps", type=int, default=None, help="A checkpoint every N steps.")
@click.option("--heldout", "heldout_fraction", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--no-eval-generate", is_flag=True, help="Skip the describe-engine metrics.")
def submit(dataset, name, base, preset, no_eval_generate, **overrides) -> None:
    from broker.celery_app import make_celery
    from db import training as runs
    from db.session import session_scope
    from training.data import prepare_dataset
    from training.messages import send_run
    from training.recipe import resolve

    settings = load_settings()
    if no_eval_generate:
        overrides["eval_generate"] = False
    recipe = resolve(preset, **overrides)
    # Read the data now: a bad path or an unusable set fails here, not hours later.
    data = prepare_dataset(dataset, heldout_fraction=recipe.heldout_fraction, seed=recipe.seed)
    for skipped in data.skipped[:50]:
        console.print(f"skipped row {skipped.row}: {skipped.reason}")
    if len(data.skipped) > 50:
        console.print(f"... and {len(data.skipped) - 50} more skipped rows")
    config = {
        "recipe": recipe.model_dump(mode="json"),
        "quant": settings.quant,
        "rows": {
            "train": len(data.train),
            "heldout": len(data.heldout),
            "skipped": len(data.skipped),
        },
    }
    sessions = _sessions(settings)
    with session_scope(sessions) as session:
        run_row = runs.create_run(
            session=session,
            name=name,
            base_model=base or settings.model,
            dataset=str(dataset),
            config=config,
        )
        run_id = run_row.id
    console.print(
        f"run {name} (id {run_id}) queued: {len(data.train)} training rows, "
        f"{len(data.heldout)} held out, {len(data.skipped)} skipped; preset {preset}, "
        f"effective batch {recipe.effective_batch}"
    )
    console.print(f"recipe: {recipe.model_dump_json()}")
    try:
        send_run(make_celery(settings), sessions, run_id)
    except Exception as e:  # recorded in SQL: a training worker's sweep sends it later
        console.print(f"warning: the broker did not take the message ({e}); a worker will send it")


@cli.command(help="Start a training worker: one run at a time from the train queue.")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--name", "-n", default=None, help="Celery node name (default train@host).")
def worker(loglevel: str, name: str | None) -> None:
    import multiprocessing

    from broker.celery_app import run_worker
    from training.app import make_app

    # The data loader's processes are spawned, never forked from a process holding CUDA.
    multiprocessing.set_start_method("spawn", force=True)
    settings = load_settings()
    code = run_worker(
        make_app(settings), queues="train", concurrency=1, loglevel=loglevel,
        hostname=name or "train@%h",
    )  # fmt: skip
    sys.exit(code)


@cli.command(help="Training runs: state, step, loss, learning rate, samples/s, ETA.")
@click.argument("name", required=False)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def status(name: str | None, fmt: str) -> None:
    from db import training as runs
    from db.session import session_scope

    settings = load_settings()
    with session_scope(_sessions(settings)) as session:
        rows = [_summary(r) for r in runs.list_runs(session=session, name=name)]
        if name is not None and not rows:
            raise runs.NoSuchRun(name)
        if name is not None:
            run_id = rows[0]["id"]
            rows[0]["loss_curve"] = runs.loss_curve(session=session, run_id=run_id)
    if not rows:
        console.print("no training runs")
        return
    if fmt == "json":
        for row in rows:
            click.echo(json.dumps(row, default=str))
        return
    table = Table(header_style="bold")
    for col in ("name", "state", "step", "loss", "lr", "samples/s", "eta", "attempts", "note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["name"],
            r["state"],
            f"{r['step']}/{r['total_steps'] or '?'}",
            _num(r["loss"], 4),
            _num(r["learning_rate"], 2, sci=True),
            _num(r["samples_per_s"], 2),
            _duration(r["eta_s"]) if r["state"] == "running" else "",
            str(r["attempts"]),
            r["reason"] or r["adapter"] or "",
        )
    console.print(table)
    if name is not None:
        _detail(rows[0])


def _summary(run) -> dict:
    metrics = run.metrics or {}
    return {
        "id": run.id,
        "name": run.name,
        "state": run.state.value,
        "base_model": run.base_model,
        "dataset": run.dataset,
        "step": run.step,
        "total_steps": run.total_steps,
        "epoch": run.epoch,
        "loss": run.loss,
        "learning_rate": run.learning_rate,
        "samples_per_s": run.samples_per_s,
        "eta_s": run.eta_s,
        "attempts": run.attempts,
        "lease_owner": run.lease_owner,
        "checkpoint": run.checkpoint_path,
        "reason": run.reason,
        "adapter": run.output_path,
        "split": run.split,
        "recipe": (run.config or {}).get("recipe"),
        "before": metrics.get("before"),
        "after": metrics.get("after"),
    }


def _detail(row: dict) -> None:
    console.print(f"recipe: {json.dumps(row['recipe'])}")
    console.print(f"split: {json.dumps(row['split'])}")
    if row["checkpoint"]:
        console.print(f"last checkpoint: {row['checkpoint']}")
    for stage in ("before", "after"):
        if row[stage]:
            console.print(f"{stage} training: {json.dumps(row[stage])}")
    curve = row.get("loss_curve") or []
    if curve:
        shown = curve if len(curve) <= 12 else curve[:6] + curve[-6:]
        console.print("loss: " + "  ".join(f"{s}:{loss:.4f}" for s, loss in shown))


def _num(value, digits: int, *, sci: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}e}" if sci else f"{value:.{digits}f}"


def _duration(seconds) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


@cli.command(help="Stop a run at its next step; its last checkpoint is kept.")
@click.argument("name")
def cancel(name: str) -> None:
    from db import training as runs
    from db.session import session_scope

    settings = load_settings()
    with session_scope(_sessions(settings)) as session:
        before = runs.find_run(session=session, name=name)
        was = before.state.value if before is not None else None
        if was in ("done", "failed", "cancelled"):
            console.print(f"run {name} is already {was}")
            return
        state = runs.request_cancel(session=session, name=name).state.value
    if state == "cancelled":
        console.print(f"run {name} cancelled")
    elif state == "running":
        console.print(f"run {name}: cancel requested; it stops at its next step")
    else:
        console.print(f"run {name}: {state}")


@cli.command(help="Write a training set from stored reports and their re-sampled frames.")
@click.option("--where", "where_text", required=True, help="e.g. 'risk_factor = high'")
@click.argument("out", type=click.Path(file_okay=False))
def export(where_text: str, out: str) -> None:
    from pathlib import Path

    from training.export import export as run_export
    from video.processes import FrameSampler

    settings = load_settings()
    # Decoded as a describe worker decodes: in killable processes, so a bad file cannot
    # hang the export.
    sampler = FrameSampler(
        processes=settings.decode_processes,
        timeout_s=settings.decode_timeout_s,
        memory_gib=settings.decode_memory_gib,
    )
    try:
        result = run_export(
            sessions=_sessions(settings),
            where_text=where_text,
            out=Path(out),
            max_side=settings.frame_max_side,
            roots=settings.video_roots,
            sampler=sampler,
        )
    finally:
        sampler.close()
    for video_id, reason in result.skipped:
        console.print(f"skipped video {video_id}: {reason}")
    console.print(f"wrote {result.rows} rows to {out} ({len(result.skipped)} skipped)")


if __name__ == "__main__":
    run(cli, "python -m training")
