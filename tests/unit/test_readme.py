"""What the README and the docs pages (and the job files' comments) claim is backed: every file they cite exists, the
README is a front door (short, linking the pages), and the status says what is built."""

from __future__ import annotations

import re

from tests.conftest import REPO

README = (REPO / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in sorted((REPO / "docs").glob("*.md"))}
CITED = re.compile(r"(?<![\w/.-])((?:tests|bench|pipeline|jobs|cluster|docs|tools|training|examples)/[\w./-]*[\w/])")


def test_every_file_the_readme_and_the_docs_cite_exists():
    cited = sorted(set(CITED.findall(README + "".join(DOCS.values()))))
    assert len(cited) > 100
    missing = [path for path in cited if not (REPO / path).exists()]
    assert missing == [], f"the README or docs cite files that do not exist: {missing}"
    links = re.findall(r"\]\((?!https?://|#)([^)#]+)", "".join(DOCS.values()))  # docs/ links are relative to docs/
    assert [link for link in links if not (REPO / "docs" / link).resolve().exists()] == []


def test_the_readme_is_a_front_door():
    """What it does, the two commands, a job, the options table and links to every docs page, in ~250 lines."""
    assert len(README.splitlines()) <= 250
    assert README.index("pip install") < README.index("## Running a job") < README.index("| key | default |")
    assert [name for name in DOCS if f"docs/{name}" not in README] == []


def test_status_does_not_call_built_features_unbuilt():
    status = README.split("## Status", 1)[1]
    not_yet = status.split("Not yet", 1)[1]
    for built in ("tensor-parallel", "decode timeouts"):
        assert built in status.split("Not yet", 1)[0] and built not in not_yet, built


def test_claims_are_no_stronger_than_their_tests():
    """Normalisation is tested within 1e-5 of the cards' values, not bit for bit; a dead nightly run's lock is taken
    over once its lease expires (tests/integration/test_lock.py), which the nightly job says."""
    fidelity = DOCS["how-it-works.md"].split("Fidelity to the model cards:", 1)[1].split("- **Prompts**", 1)[0]
    assert "within 1e-5" in fidelity and not re.search(r"normalis\w+[^.]*bit for bit", fidelity)
    nightly = (REPO / "jobs" / "caption_nightly.yaml").read_text()
    assert "lease" in nightly and "takes it over" in nightly


def test_every_performance_figure_names_a_bench_that_exists():
    performance = DOCS["performance.md"].split("## Performance", 1)[1].split("\n## ", 1)[0]
    scripts = set(re.findall(r"`(?:bench/)?(\w+\.py)", performance))
    assert {"cpu_stage.py", "fast_mode.py", "frame_sampling.py", "pipeline_vs_naive.py", "memory_scaling.py"} <= scripts
    assert [s for s in sorted(scripts) if not (REPO / "bench" / s).exists()] == []
