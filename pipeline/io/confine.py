"""Where a job's samples may be read from: one rule per job, checked on every URI before anything is read.

A manifest is often made by someone else (a crawl's URL list, a customer's upload); its URIs must not reach the
node's own files, buckets the job was not meant to read, or the cloud's metadata service. The rule:

- the input's own location is allowed: a local input (a manifest or a folder on this machine) may name local
  files; a remote one its own scheme and bucket (for http(s): its host and port); an S3 Inventory report its
  scheme, any bucket (a report lives in one bucket and names the objects of another);
- so are the prefixes the job lists in `allowed_inputs`: `s3://`, `gs://`, `az://` or `http(s)://` URLs, each a
  folder (`s3://bucket/images` allows what is under `images/`); one without a bucket or host allows any;
- never: a local path (`/etc/...`, `file://`) from a remote input; link-local and metadata addresses
  (169.254.0.0/16, fe80::/10, fd00:ec2::254, 100.100.100.200, in any spelling: `0xa9fea9fe`, `[::ffff:...]`) and
  the metadata services' names (`metadata.google.internal`...); fsspec URL chains (`a::b`), which would open one
  filesystem through another; user info (`user@host`) and `.` / `..` segments in a remote URI;
- a prefix for any host (`https://`) does not match a loopback host (`localhost`, 127.0.0.0/8, `::1`): naming the
  host (`http://127.0.0.1:8000/`) allows it.

A hostname that resolves to a refused address is caught where the connection is made (`io/http.py` checks the
address it connected to before sending a byte). Pure functions of strings: nothing here resolves or connects.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

LOCAL = "local"
# One name per kind of store: fsspec knows each under several protocols.
SCHEME_ALIASES = {"file": LOCAL, "s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}
HTTP_SCHEMES = ("http", "https")
LISTABLE_SCHEMES = ("s3", "gs", "az", *HTTP_SCHEMES)  # what allowed_inputs may name (after aliases)
DEFAULT_PORTS = {"http": 80, "https": 443}
METADATA_ADDRESSES = tuple(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OCI, DigitalOcean... (inside 169.254.0.0/16, refused whole)
    "fd00:ec2::254",  # AWS over IPv6
    "100.100.100.200",  # Alibaba Cloud
))
METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal"})
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class RefusedInput(Exception):
    """A URI (a redirect's target, the address a name resolved to) the job's rule refuses: never read. Not an
    OSError, so no retry layer takes it for a transient failure."""


@dataclass(frozen=True)
class Prefix:
    """One allowed location: a scheme, a bucket or host ('' for any) and, for http(s), a port, and a folder."""

    scheme: str
    host: str
    port: int | None
    path: str  # without leading or trailing '/'; '' for the whole bucket or host

    def __str__(self) -> str:
        if not self.host:
            return f"{self.scheme}:// (any {'host' if self.scheme in HTTP_SCHEMES else 'bucket'})"
        port = f":{self.port}" if self.port is not None and self.port != DEFAULT_PORTS.get(self.scheme) else ""
        return f"{self.scheme}://{self.host}{port}/{self.path + '/' if self.path else ''}"


@dataclass(frozen=True)
class InputRule:
    """Where one job's samples may be read from: local files (a local input), and these prefixes."""

    local: bool
    prefixes: tuple[Prefix, ...]

    def __str__(self) -> str:
        return ", ".join((["local files"] if self.local else []) + [str(p) for p in self.prefixes]) or "nothing"


@dataclass(frozen=True)
class _Location:
    scheme: str
    host: str  # bucket, container or host name (lower case for http)
    port: int | None
    path: str


def scheme_of(uri: str) -> str:
    """The kind of store a URI names: 'local' for a path or file://, else its scheme with aliases merged."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else LOCAL
    return SCHEME_ALIASES.get(scheme, scheme)


def _parse(uri: str) -> _Location:
    """Scheme, bucket or host, port and path of a remote URI; ValueError for one that cannot be read as such."""
    scheme = scheme_of(uri)
    rest = uri.split("://", 1)[1]
    if scheme in HTTP_SCHEMES:
        parts = urlsplit(uri)
        if "@" in parts.netloc:
            raise ValueError("user info ('user@host') in an http(s) URI")
        host = (parts.hostname or "").rstrip(".")
        port = parts.port  # ValueError for a port that is not a number
        return _Location(scheme, host, port if port is not None else DEFAULT_PORTS[scheme], parts.path.strip("/"))
    netloc, _, path = rest.partition("/")
    return _Location(scheme, netloc, None, path.strip("/"))


def parse_prefix(entry: str) -> Prefix:
    """An `allowed_inputs` entry as a Prefix; ValueError naming what is wrong with it."""
    if scheme_of(entry) not in LISTABLE_SCHEMES or is_chain(entry):
        raise ValueError(f"{entry!r}: only s3://, gs://, az:// and http(s):// prefixes may be listed")
    where = _parse(entry)
    if where.host and refused_host(where.host):
        raise ValueError(f"{entry!r}: {refused_host(where.host)}")
    port = where.port if where.host else None  # "https://" is any host on any port
    return Prefix(where.scheme, where.host, port, where.path)


def input_rule(input_url: str | None, allowed: Sequence[str] = (), *, inventory: bool = False) -> InputRule:
    """The rule of a job reading `input_url`: its own location (any bucket of its scheme for an inventory report)
    plus the `allowed` prefixes. No input (rows handed to annotate() by the caller's own program, on its own
    machine): local files and the `allowed` prefixes."""
    listed = tuple(parse_prefix(a) for a in allowed)
    if input_url is None or scheme_of(input_url) == LOCAL:
        return InputRule(local=True, prefixes=listed)
    where = _parse(input_url)
    own = Prefix(where.scheme, "" if inventory else where.host, None if inventory else where.port, "")
    return InputRule(local=False, prefixes=(own, *listed))


def refusal(uri: str, rule: InputRule) -> str | None:
    """Why `uri` may not be read under `rule` (a sentence naming the rule), or None when it may."""
    if is_chain(uri):
        return f"{uri!r} is an fsspec URL chain ('::'), which inputs may not use"
    if scheme_of(uri) == LOCAL:
        return None if rule.local else f"{uri!r} is a local path, and the input is remote ({rule}): refused always"
    try:
        where = _parse(uri)
    except ValueError as err:
        return f"{uri!r}: {err}"
    reason = refused_host(where.host)
    if reason:
        return f"{uri!r}: {reason}"
    if any(unquote(segment) in (".", "..") for segment in where.path.split("/")):
        return f"{uri!r} has '.' or '..' segments in its path"
    if not any(_matches(where, p) for p in rule.prefixes):
        return f"{uri!r} is outside the allowed inputs ({rule}); list its prefix in allowed_inputs to read it"
    return None


def is_chain(uri: str) -> bool:
    """Whether a URI chains fsspec filesystems ('::'); an http(s) URI's bracketed IPv6 host is not a chain (it is
    read by io/http.py, not fsspec)."""
    if scheme_of(uri) in HTTP_SCHEMES:
        uri = re.sub(r"\[[^\]/]*\]", "", uri, count=1)
    return "::" in uri


def _matches(where: _Location, prefix: Prefix) -> bool:
    if where.scheme != prefix.scheme:
        return False
    if prefix.host:
        if where.host != prefix.host or (prefix.port is not None and where.port != prefix.port):
            return False
    elif where.scheme in HTTP_SCHEMES and is_loopback(where.host):
        return False  # any host, except this machine's own services: those must be named
    return not prefix.path or where.path == prefix.path or where.path.startswith(prefix.path + "/")


def host_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a literal host spells, in any form a resolver accepts (`169.254.169.254`, `2852039166`,
    `0xa9.0xfe.0xa9.0xfe`, `[fd00:ec2::254]`); None for a name."""
    host = host.strip("[]")
    if ":" in host:
        try:
            return ipaddress.ip_address(host)
        except ValueError:
            return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))  # parses the legacy forms as getaddrinfo would
    except OSError:
        return None


def refused_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address | str) -> str | None:
    """Why an address may never be read from (link-local, or a cloud's metadata service), or None."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None)
        if embedded is not None:
            return refused_address(embedded)
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata service's address (refused always)"
    if ip.is_link_local:
        return f"{ip} is a link-local address, where metadata services live (refused always)"
    return None


def refused_host(host: str) -> str | None:
    """Why a URI's host may never be read from: a refused address in any spelling, or a metadata service's name."""
    name = host.lower().rstrip(".")
    if name in METADATA_NAMES:
        return f"{host} is a cloud metadata service's name (refused always)"
    address = host_address(name)
    return refused_address(address) if address is not None else None


def is_loopback(host: str) -> bool:
    """Whether a host is this machine itself (by name or address)."""
    name = host.lower().rstrip(".")
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    address = host_address(name)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address is not None and (address.is_loopback or address.is_unspecified)
