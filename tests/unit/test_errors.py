"""The error taxonomy is one enum, and the table in docs/output.md is that enum."""

from pipeline.errors import ErrorType, MediaError
from tests.conftest import REPO


def test_readme_error_table_is_the_enum():
    readme = (REPO / "docs" / "output.md").read_text()
    for kind in ErrorType:
        assert f"| `{kind.value}` | {kind.description} |" in readme, kind


def test_media_error_takes_only_known_types():
    assert MediaError("timeout", "slow").error_type is ErrorType.TIMEOUT
    try:
        MediaError("no_such_type", "x")
    except ValueError:
        return
    raise AssertionError("an unknown error type was accepted")
