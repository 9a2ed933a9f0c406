"""The end-of-run table explains a figure only where the figure calls for it."""

from __future__ import annotations

from rich.console import Console

from pipeline.cli import summary_table
from pipeline.run.summary import RunSummary


def rendered(busy: float) -> str:
    summary = RunSummary(rows_in=4, rows_out=4, rows_ok=4, rows_error=0, errors_by_type={}, tiles=4, input_tokens=0,
                         generated_tokens=8, wall_s=2.0, fingerprint="f", task="caption", model="m", output="o",
                         files=1, model_busy_fraction=busy, replicas={"0": {"images_per_s": 2.0, "tokens_per_s": 4.0}})
    console = Console(record=True, width=200)
    console.print(summary_table(summary))
    return console.export_text()


def test_the_cpu_stage_is_blamed_only_when_the_model_waited():
    busy = [line for line in rendered(1.0).splitlines() if "model busy" in line]
    assert len(busy) == 1 and "100% of 1 replica(s)' time" in busy[0] and "low" not in busy[0]
    assert "(low: the CPU stage cannot keep up)" in rendered(0.35) and "35%" in rendered(0.35)
