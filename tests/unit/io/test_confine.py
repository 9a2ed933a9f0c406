"""Input confinement as a pure function of (URI, the job's rule): nothing here resolves a name or opens a socket."""

from __future__ import annotations

import pytest

from pipeline.config import parse_job
from pipeline.errors import JobError
from pipeline.io.confine import input_rule, is_loopback, refusal, refused_address, refused_host

S3_MANIFEST = input_rule("s3://bucket/lists/m.jsonl")
LOCAL_MANIFEST = input_rule("/data/lists/m.jsonl")

METADATA_URIS = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "https://169.254.169.254/",
    "http://169.254.170.2/v2/credentials",  # ECS task credentials: link-local
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[fe80::1]/",
    "http://[::ffff:169.254.169.254]/",  # IPv4-mapped
    "http://[::ffff:a9fe:a9fe]/",
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64
    "http://[2002:a9fe:a9fe::1]/",  # 6to4
    "http://2852039166/",  # 169.254.169.254 as one number
    "http://0xa9fea9fe/",
    "http://0251.0376.0251.0376/",  # octal
    "http://169.254.43518/",
    "http://100.100.100.200/latest/meta-data/",  # Alibaba Cloud
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://METADATA.google.internal./computeMetadata/v1/",
    "http://metadata/computeMetadata/v1/",
    "http://metadata.goog/",
    "http://instance-data/latest/",
    "http://169.254.169.254:80/",
    "s3://169.254.169.254/key",
]


@pytest.mark.parametrize("uri", METADATA_URIS)
def test_link_local_and_metadata_addresses_are_refused_even_when_listed(uri):
    rule = input_rule("https://lists.example.com/m.csv", ["https://", "http://", "s3://"])
    reason = refusal(uri, rule)
    assert reason is not None and "refused always" in reason, reason
    assert refusal(uri, input_rule("/data/m.jsonl", ["https://", "http://", "s3://"])) is not None


@pytest.mark.parametrize("address", ["169.254.169.254", "169.254.0.1", "fd00:ec2::254", "fe80::1", "fe80::1%2",
                                     "::ffff:169.254.169.254", "100.100.100.200"])
def test_refused_addresses(address):
    assert refused_address(address) is not None


@pytest.mark.parametrize("host", ["10.0.0.7", "192.168.1.1", "8.8.8.8", "2001:db8::1", "cdn.example.com", "bucket",
                                  "169.253.1.1", "metadata.example.com"])
def test_ordinary_hosts_are_not_refused(host):
    assert refused_host(host) is None


def test_a_remote_manifest_may_name_its_own_bucket_only():
    assert refusal("s3://bucket/images/a.jpg", S3_MANIFEST) is None
    assert refusal("s3a://bucket/images/a.jpg", S3_MANIFEST) is None  # one store, two protocol names
    other = refusal("s3://other-bucket/a.jpg", S3_MANIFEST)
    assert "outside the allowed inputs (s3://bucket/)" in other and "allowed_inputs" in other
    assert refusal("s3://bucket-2/a.jpg", S3_MANIFEST) is not None
    assert refusal("gs://bucket/a.jpg", S3_MANIFEST) is not None
    assert refusal("https://cdn.example.com/a.jpg", S3_MANIFEST) is not None


@pytest.mark.parametrize("uri", ["/etc/passwd", "file:///etc/passwd", "local:///etc/passwd", "FILE:///etc/hosts",
                                 "../../etc/passwd", "~/.aws/credentials"])
def test_a_remote_manifest_never_names_local_files(uri):
    for rule in (S3_MANIFEST, input_rule("s3://bucket/m.jsonl", ["s3://", "https://"])):
        reason = refusal(uri, rule)
        assert reason is not None and "local path" in reason and "refused always" in reason


def test_a_local_manifest_names_local_files_and_listed_prefixes():
    assert refusal("/data/images/a.jpg", LOCAL_MANIFEST) is None
    assert refusal("file:///data/images/a.jpg", LOCAL_MANIFEST) is None
    assert refusal("relative/a.jpg", LOCAL_MANIFEST) is None
    assert "outside the allowed inputs (local files)" in refusal("s3://bucket/a.jpg", LOCAL_MANIFEST)
    rule = input_rule("/data/m.jsonl", ["s3://bucket/images", "https://cdn.example.com/"])
    assert refusal("s3://bucket/images/a.jpg", rule) is None
    assert refusal("s3://bucket/images/deep/b.jpg", rule) is None
    assert refusal("s3://bucket/images-private/a.jpg", rule) is not None  # a folder, not a string prefix
    assert refusal("s3://bucket/a.jpg", rule) is not None
    assert refusal("https://cdn.example.com/x/a.jpg", rule) is None
    assert refusal("https://cdn.example.com:443/x/a.jpg", rule) is None
    assert refusal("https://cdn.example.com:8443/x/a.jpg", rule) is not None
    assert refusal("http://cdn.example.com/x/a.jpg", rule) is not None
    assert refusal("https://cdn.example.com.evil.net/a.jpg", rule) is not None


def test_an_http_manifest_may_name_its_own_host():
    rule = input_rule("https://lists.example.com/crawl/urls.csv")
    assert refusal("https://lists.example.com/img/1.jpg", rule) is None
    assert refusal("https://img.example.com/1.jpg", rule) is not None


def test_any_host_but_this_machine():
    rule = input_rule("s3://bucket/m.jsonl", ["https://", "http://"])
    assert refusal("https://any.example.org/a.jpg", rule) is None
    for uri in ("http://localhost:8265/api/jobs/", "http://127.0.0.1:8265/", "http://127.1/", "http://[::1]/",
                "http://0.0.0.0:6379/", "http://foo.localhost/", "http://2130706433/"):
        assert refusal(uri, rule) is not None, uri
    named = input_rule("s3://bucket/m.jsonl", ["http://127.0.0.1:8000/"])
    assert refusal("http://127.0.0.1:8000/a.jpg", named) is None
    assert refusal("http://127.0.0.1:8001/a.jpg", named) is not None
    assert is_loopback("LOCALHOST") and not is_loopback("cdn.example.com")


@pytest.mark.parametrize("uri", [
    "s3://bucket/images/../../other/a.jpg",
    "https://cdn.example.com/x/../admin",
    "https://cdn.example.com/x/%2e%2e/admin",
    "https://cdn.example.com@169.254.169.254/",  # user info: the host is what follows '@'
    "https://user:pw@cdn.example.com/a.jpg",
    "simplecache::s3://bucket/a.jpg",
    "s3://bucket/a.jpg::file:///etc/passwd",
    "https://cdn.example.com:notaport/a.jpg",
])
def test_tricks_are_refused(uri):
    rule = input_rule("s3://bucket/m.jsonl", ["https://cdn.example.com/"])
    assert refusal(uri, rule) is not None


def test_an_inventory_report_names_objects_of_another_bucket():
    rule = input_rule("s3://reports/inv/manifest.json", inventory=True)
    assert refusal("s3://source-bucket/a.jpg", rule) is None
    assert refusal("gs://source-bucket/a.jpg", rule) is not None
    assert refusal("/etc/passwd", rule) is not None


def test_the_job_key_is_checked_when_the_job_is_read():
    job = {"task": "caption", "input": "s3://b/m.jsonl", "output": "o", "model": "m"}
    assert parse_job(job).allowed_inputs == []
    assert parse_job({**job, "allowed_inputs": ["s3://other/", "gs://g", "az://c/p", "https://"]}).allowed_inputs
    for entry in ("/data", "file:///data", "memory://x", "s3://b::file:///x", "http://169.254.169.254/",
                  "http://metadata.google.internal/"):
        with pytest.raises(JobError, match="allowed_inputs"):
            parse_job({**job, "allowed_inputs": [entry]})
