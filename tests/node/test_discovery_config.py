"""`[discovery]` in the node configuration (issue 21 item 2): the table of DESIGN's contract parses, defaults
included; every bad key is refused naming it; a node refuses its own membership when it is not signed by a
configured authority, expired, another key's or another id's; `authority` and `trust_store` exclude each
other, and `trust_store` is warned at every start."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from vpn_packet.mesh.membership import ANY_AUTHORITY, sign_membership, write_record_file
from vpn_packet.node.config import ConfigError, diff_configs, load_config, start_warnings
from vpn_packet.testutil.keys import identities
from vpn_packet.transport.identity import NodeIdentity
from vpn_packet.tuning import DISCOVERY_PREFIX, DISCOVERY_TTL

BASE = """\
[interface]
name = "vpn0"
address = "10.8.0.1/24"

[listen]
address = "{listen}"

[node]
key = "{key}"

[discovery]
"""


def _membership(
    path: Path,
    authority: NodeIdentity,
    member: NodeIdentity,
    member_id: str = "node-a",
    *,
    issued: float | None = None,
) -> Path:
    membership = sign_membership(
        authority,
        member_id=member_id,
        public_key=member.public_key_bytes,
        allowed_ips=["10.8.0.1/32"],
        issued=int(time.time() if issued is None else issued),
        days=1,
    )
    return write_record_file(path, membership.record, membership.summary())


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, NodeIdentity]:
    return identities(tmp_path, "node-a", "authority", "authority2", "node-b")


def _write(
    tmp_path: Path, keys: dict[str, NodeIdentity], discovery: str, listen: str = "192.168.77.1:7000"
) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(BASE.format(listen=listen, key=keys["node-a"].path) + textwrap.dedent(discovery))
    return path


def _good(
    tmp_path: Path, keys: dict[str, NodeIdentity], extra: str = "", listen: str = "192.168.77.1:7000"
) -> Path:
    _membership(tmp_path / "node-a.member", keys["authority"], keys["node-a"])
    return _write(
        tmp_path,
        keys,
        f'etcd = ["http://127.0.0.1:2379"]\nauthority = "{keys["authority"].public_key}"\n'
        f'membership = "node-a.member"\n{extra}',
        listen,
    )


def test_the_contract_table_parses_with_its_defaults_and_no_static_peers(
    tmp_path: Path, keys: dict[str, NodeIdentity]
) -> None:
    config = load_config(_good(tmp_path, keys))
    assert config.peers == ()
    discovery = config.discovery
    assert discovery is not None
    assert discovery.etcd == ("http://127.0.0.1:2379",)
    assert discovery.authorities == (keys["authority"].public_key_bytes,)
    assert discovery.membership.id == "node-a"
    assert discovery.membership_path == tmp_path / "node-a.member"
    assert (discovery.prefix, discovery.ttl) == (DISCOVERY_PREFIX, DISCOVERY_TTL)
    assert discovery.endpoint == "192.168.77.1:7000"
    assert discovery.state == Path("/var/lib/vpn-packet/vpn0.state")
    assert discovery.trusted == {keys["authority"].public_key_bytes}
    assert start_warnings(config, read_sysctl=lambda name: "1") == []


def test_every_key_set(tmp_path: Path, keys: dict[str, NodeIdentity]) -> None:
    for name in ("ca.pem", "cert.pem", "cert.key"):
        (tmp_path / name).write_text("x")
    _membership(tmp_path / "node-a.member", keys["authority2"], keys["node-a"])
    path = _write(
        tmp_path,
        keys,
        f"""\
        etcd = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
        authority = ["{keys["authority"].public_key}", "{keys["authority2"].public_key}"]
        membership = "node-a.member"
        prefix = "/mesh/lab/"
        ttl = 5
        endpoint = "node-a.example:7000"
        state = "node-a.state"
        ca = "ca.pem"
        cert = "cert.pem"
        key = "cert.key"
        """,
        listen="0.0.0.0:7000",
    )
    discovery = load_config(path).discovery
    assert discovery is not None
    assert len(discovery.authorities) == 2
    assert (discovery.prefix, discovery.ttl, discovery.endpoint) == ("/mesh/lab/", 5, "node-a.example:7000")
    assert discovery.state == tmp_path / "node-a.state"
    assert (discovery.ca, discovery.cert, discovery.key) == (
        tmp_path / "ca.pem",
        tmp_path / "cert.pem",
        tmp_path / "cert.key",
    )


@pytest.mark.parametrize(
    ("extra", "key", "message"),
    [
        ("ttl = 1", "discovery.ttl", "out of range"),
        ("ttl = 3601", "discovery.ttl", "out of range"),
        ('prefix = "no-slash"', "discovery.prefix", "key prefix"),
        ('endpoint = "0.0.0.0:7000"', "discovery.endpoint", "wildcard"),
        ('endpoint = "nonsense"', "discovery.endpoint", "host:port"),
        ('state = ""', "discovery.state", "file path"),
        ('ca = "missing.pem"', "discovery.ca", "not found"),
        ("trust_store = true", "discovery.trust_store", "together with authority"),
        ("trust_store = 1", "discovery.trust_store", "true or false"),
        ("zzz = 1", "discovery.zzz", "unknown key"),
    ],
)
def test_bad_values_are_refused_naming_the_key(
    tmp_path: Path, keys: dict[str, NodeIdentity], extra: str, key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_good(tmp_path, keys, extra))
    assert caught.value.key == key
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ('authority = "{authority}"\nmembership = "node-a.member"', "discovery.etcd", "missing"),
        ('etcd = []\nauthority = "{authority}"\nmembership = "node-a.member"', "discovery.etcd", "non-empty"),
        (
            'etcd = ["ftp://x:1"]\nauthority = "{authority}"\nmembership = "node-a.member"',
            "discovery.etcd[0]",
            "URL",
        ),
        (
            'etcd = ["http://a:1", "https://b:2"]\nauthority = "{authority}"\nmembership = "node-a.member"',
            "discovery.etcd",
            "mixes",
        ),
        ('etcd = ["http://a:1"]\nmembership = "node-a.member"', "discovery.authority", "trust_store"),
        ('etcd = ["http://a:1"]\nauthority = "{authority}"', "discovery.membership", "missing"),
        (
            'etcd = ["http://a:1"]\nauthority = "{own}"\nmembership = "node-a.member"',
            "discovery.authority",
            "own key",
        ),
        (
            'etcd = ["http://a:1"]\nauthority = "' + "A" * 43 + '="\nmembership = "node-a.member"',
            "discovery.authority",
            "small order",
        ),
        (
            'etcd = ["http://a:1"]\nauthority = ["{authority}", "{authority}"]\nmembership = "node-a.member"',
            "discovery.authority[1]",
            "twice",
        ),
    ],
)
def test_missing_and_bad_keys(
    tmp_path: Path, keys: dict[str, NodeIdentity], table: str, key: str, message: str
) -> None:
    _membership(tmp_path / "node-a.member", keys["authority"], keys["node-a"])
    text = table.format(authority=keys["authority"].public_key, own=keys["node-a"].public_key)
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, keys, text))
    assert caught.value.key == key
    assert message in str(caught.value)


def test_a_wildcard_listen_address_needs_an_endpoint(tmp_path: Path, keys: dict[str, NodeIdentity]) -> None:
    with pytest.raises(ConfigError, match=r"discovery.endpoint: missing: listen.address is the wildcard"):
        load_config(_good(tmp_path, keys, listen="0.0.0.0:7000"))


@pytest.mark.parametrize(
    ("signer", "member", "member_id", "age", "message"),
    [
        ("authority2", "node-a", "node-a", 0, "no configured authority"),
        ("authority", "node-b", "node-a", 0, "names another key"),
        ("authority", "node-a", "node-x", 0, "is the membership of 'node-x'"),
        ("authority", "node-a", "node-a", 3 * 86_400, "expired"),
    ],
)
def test_the_node_refuses_a_membership_that_is_not_its_own_or_not_valid(
    tmp_path: Path,
    keys: dict[str, NodeIdentity],
    signer: str,
    member: str,
    member_id: str,
    age: int,
    message: str,
) -> None:
    path = _good(tmp_path, keys)
    _membership(tmp_path / "node-a.member", keys[signer], keys[member], member_id, issued=time.time() - age)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "discovery.membership"
    assert message in str(caught.value)


def test_an_unsigned_membership_file_is_refused(tmp_path: Path, keys: dict[str, NodeIdentity]) -> None:
    path = _good(tmp_path, keys)
    (tmp_path / "node-a.member").write_text("bm90IGEgbWVtYmVyc2hpcA==\n")
    with pytest.raises(ConfigError, match=r"discovery.membership: .*not a vpn-packet mesh record"):
        load_config(path)


def test_trust_store_accepts_any_authority_and_is_warned(
    tmp_path: Path, keys: dict[str, NodeIdentity]
) -> None:
    _membership(tmp_path / "node-a.member", keys["authority2"], keys["node-a"])
    config = load_config(
        _write(tmp_path, keys, 'etcd = ["http://a:2379"]\nmembership = "node-a.member"\ntrust_store = true\n')
    )
    assert config.discovery is not None
    assert config.discovery.trusted is ANY_AUTHORITY
    assert config.discovery.authorities == ()
    (warning,) = start_warnings(config, read_sysctl=lambda name: "1")
    assert warning.startswith("discovery.trust_store = true")


def test_discovery_needs_key_mode(tmp_path: Path, keys: dict[str, NodeIdentity]) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        BASE.replace('key = "{key}"', 'id = "node-a"\ninsecure = true').format(listen="192.168.77.1:7000")
        + 'etcd = ["http://a:2379"]\ntrust_store = true\nmembership = "x"\n'
    )
    with pytest.raises(ConfigError, match=r"^discovery: needs key mode"):
        load_config(path)


def test_without_discovery_static_peers_stay_required(tmp_path: Path, keys: dict[str, NodeIdentity]) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        BASE.format(listen="192.168.77.1:7000", key=keys["node-a"].path).replace("[discovery]\n", "")
    )
    with pytest.raises(ConfigError, match=r"^peers: missing"):
        load_config(path)


def test_a_changed_discovery_table_needs_a_restart(tmp_path: Path, keys: dict[str, NodeIdentity]) -> None:
    old = load_config(_good(tmp_path, keys))
    new = load_config(_good(tmp_path, keys, "ttl = 20"))
    assert diff_configs(old, new).restart == ("discovery",)
