"""A run never needs the training code (training/, beside pipeline/ and not installed by `pip install .`): importing
the runner, the CLI and the demo leaves no `training` module loaded, no module of the package imports it, and
`make-tiny-model --trained` writes the committed checkpoint with training made unimportable, byte for byte."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

# the sha256 of model.safetensors as training/train_tiny.py wrote it (commit 25e9f41), committed gzipped since
TRAINED_WEIGHTS_SHA256 = "381d8cb3a28423fd460822fe1d12f953f1744297229263fcfb7d6f85765e75f2"

# Run in a fresh interpreter: this test process may have imported training for other tests.
BLOCK_TRAINING = """
import sys
from importlib.abc import MetaPathFinder

class NoTraining(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "training" or name.startswith("training."):
            raise ImportError(f"a run imported {name}")
        return None

sys.meta_path.insert(0, NoTraining())
"""


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_run_imports_no_training_module():
    out = _python("import sys\n"
                  "import pipeline.cli, pipeline.embedded.demo, pipeline.embedded.meaning, pipeline.run.runner\n"
                  "print(sorted(m for m in sys.modules if m.split('.')[0] == 'training'))")
    assert out.strip() == "[]"


def test_no_module_of_the_package_imports_training():
    found = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == "training"]
    assert found == []


def test_the_trained_checkpoint_is_written_without_training_code(tmp_path):
    out = _python(BLOCK_TRAINING + f"""
import hashlib
from pipeline.cli import main
import pipeline.embedded.demo
sys.argv = ["internvl-batch", "make-tiny-model", {str(tmp_path / "model")!r}, "--trained"]
try:
    main()
except SystemExit as exit:
    assert not exit.code, exit.code
print(hashlib.sha256(open({str(tmp_path / "model" / "model.safetensors")!r}, "rb").read()).hexdigest())
""")
    assert out.strip().splitlines()[-1] == TRAINED_WEIGHTS_SHA256
    assert (tmp_path / "model" / "processor_config.json").exists()
