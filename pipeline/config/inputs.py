"""The job's keys about reading inputs: where samples may come from (`allowed_inputs`) and how http(s) URLs are
fetched (`http`)."""

from __future__ import annotations

from pydantic import Field

from pipeline.config.sections import _Section
from pipeline.io.confine import parse_prefix

ALLOWED_INPUTS_HELP = (
    "Locations samples may be read from besides the input's own (a local input: local files; a remote one: its "
    "bucket, or its host for http(s); an S3 Inventory report: any bucket of its scheme): s3://, gs://, az:// or "
    "http(s):// prefixes, each a folder; one without a bucket or host allows any (https:// allows every host but "
    "this machine's). A URI outside them, a local path named by a remote input, or a link-local / metadata address "
    "is never read: it becomes a bad_input row naming the rule.")


class HttpConfig(_Section):
    timeout_s: float = Field(30.0, gt=0, description="Seconds to connect, and to wait for each part of the answer; "
                                                     "then the try fails (and is retried).")
    attempts: int = Field(5, ge=1, le=20, description="Tries per URL, for timeouts, lost connections, 429 and 5xx.")
    backoff_s: float = Field(0.5, ge=0, description="Wait before the second try, doubled for each further one (up "
                                                    "to 60 s), plus a random jitter of up to as much again; a "
                                                    "Retry-After header (up to 60 s) replaces it.")
    max_per_host: int = Field(8, ge=1, le=256, description="Requests in flight to one host from one worker process "
                                                           "at most (a CPU task fetches its samples one at a time).")


def check_allowed_inputs(entries: list[str]) -> list[str]:
    """Each `allowed_inputs` entry is a prefix the confinement rule can use (io/confine.py)."""
    for entry in entries:
        parse_prefix(entry)  # ValueError naming the entry
    return entries
