"""`vpn-packet example-config [--name NAME]`: prints a complete, commented starting config for a node.

The text comes from `TEMPLATE` below and nowhere else: `examples/node-a.toml` and `examples/node-b.toml` are
this command's output for the two ends of the README's tunnel (`EXAMPLES` lists the arguments of each, and a
test checks the files are exactly that output), so the examples and the command cannot drift apart.

The config is key mode (`[node] key`, each peer's `public_key`); its only placeholder is the peer's public key
(the one line containing `PASTE`), which the config loader refuses until it is replaced.
"""

from __future__ import annotations

import argparse
from string import Template

from vpn_packet.cli._command import EXIT_OK, Subcommand

__all__ = ["COMMAND", "EXAMPLES", "TEMPLATE", "render"]

TEMPLATE = Template(
    """\
# vpn-packet node $name: one end of a tunnel to $peer (see README "Running a node").
# Written by `vpn-packet example-config` (see its --help); every key is explained where it is set.
#   1. on this host: `vpn-packet genkey $name` writes $name.key and prints its public key;
#   2. on $peer's host: `vpn-packet genkey $peer`; paste the key it prints into public_key below;
#   3. sudo .venv/bin/vpn-packet node --config $name.toml
#      or as a service (packaging/README.md): this file as /etc/vpn-packet/vpn0.toml, then
#      systemctl enable --now vpn-packet@vpn0
# The node refuses a bad value at start with one line naming its key (exit status 2).

[interface]
name = "vpn0"                 # the TUN device the node creates (at most 15 characters)
address = "$address"       # this node's tunnel address and subnet; a list for more (IPv6 too)
mtu = 1400                    # the same on every node; a larger MTU is much faster
# txqueuelen = 1000
# offload = true              # bulk TCP/UDP crosses as 64 KB super-packets (TSO/USO); false: plain packets

[listen]
address = "0.0.0.0:7000"      # where peers connect to this node (TCP and TLS 1.3)

[node]
key = "$name.key"            # this node's identity, relative to this file; it names the node ($name)
log_level = "info"            # debug, info, warning, error (vpn-packet node --log-level overrides it)
# metrics_file = "/run/vpn-packet/$name.json"   # written on SIGUSR1 and at exit
# metrics_listen = "127.0.0.1:9108"              # HTTP: /metrics (Prometheus text), /metrics.json
# insecure = true                                # plaintext and unauthenticated: for tests only

# One [[peers]] table per node this one forwards to.
[[peers]]
id = "$peer"                 # the peer's name: the one its key file carries
endpoint = "$endpoint"  # where it listens ([listen] address on its host), as reached from here
allowed_ips = ["$allowed_ip"] # what it owns: packets to these go to it, and from it only from these
# Its public key: the last line `vpn-packet genkey $peer` printed on its host (`vpn-packet pubkey`
# prints it again from $peer.key). The node refuses to start until this line holds a real key.
public_key = "PASTE the last line 'vpn-packet genkey $peer' printed"

# Instead of keys: certificates from your own CA. Then drop [node] key and every public_key, and set
# [node] id = "$name" (the name the certificate carries).
# [tls]
# cert = "$name.pem"
# key = "$name-cert.key"
# ca = "ca.pem"

# Queue and batch sizes, timeouts, connection limits (vpn_packet.tuning.Tuning lists every key).
# [tuning]
# worker_buffer_size = 4096
# read_batch = 256
# data_plane_threads = 1        # 0: the steady packet work stays on the event loop

# Per-peer circuit breaker and retry.
# [resilience]
# failure_threshold = 5   # consecutive failures that open a peer's breaker
# reset_timeout = 2.0     # seconds before a peer whose breaker opened is tried again
# max_attempts = 3        # write attempts per batch, the first included
"""
)

#: The defaults of the options: node A of the README's two-node tunnel.
DEFAULTS: dict[str, str] = {
    "name": "node-a",
    "peer": "node-b",
    "address": "10.8.0.1/24",
    "peer_address": "10.8.0.2",
    "endpoint": "192.168.77.2:7000",
}

#: examples/FILE and the arguments that print it.
EXAMPLES: dict[str, list[str]] = {
    "node-a.toml": [],
    "node-b.toml": [
        "--name=node-b",
        "--peer=node-a",
        "--address=10.8.0.2/24",
        "--peer-address=10.8.0.1",
        "--endpoint=192.168.77.1:7000",
    ],
}


def render(
    name: str = DEFAULTS["name"],
    peer: str = DEFAULTS["peer"],
    address: str = DEFAULTS["address"],
    peer_address: str = DEFAULTS["peer_address"],
    endpoint: str = DEFAULTS["endpoint"],
) -> str:
    """The starting config for node `name` with one peer `peer` (at `endpoint`, owning `peer_address`).

    Raises `UsageError` naming the option when a value is not one the node would accept."""
    import ipaddress
    import tomllib

    from vpn_packet import tuning
    from vpn_packet.errors import ConfigError, UsageError
    from vpn_packet.node.config import parse_config

    values = {
        "name": name,
        "peer": peer,
        "address": address,
        "peer_address": peer_address,
        "endpoint": endpoint,
    }
    checks = (
        ("--name", tuning.check_peer_id, name),
        ("--peer", tuning.check_peer_id, peer),
        ("--address", tuning.check_interface_address, address),
        ("--peer-address", ipaddress.ip_address, peer_address),
        ("--endpoint", tuning.parse_endpoint, endpoint),
    )
    for option, rule, value in checks:
        try:
            rule(value)
        except ValueError as exc:
            raise UsageError(f"{option}: {exc}") from None
    if name == peer:
        raise UsageError(f"--peer: {peer!r} is also --name: a node is not its own peer")
    ip = ipaddress.ip_address(peer_address)
    text = TEMPLATE.substitute(values, allowed_ip=f"{ip}/{ip.max_prefixlen}")
    # The same rules as the node's: parsed without keys (which only exist once genkey ran), every other key
    # of the text is checked, e.g. a peer address that is this node's own.
    try:
        data = tomllib.loads(text)
        data["node"] = {"id": name, "insecure": True}
        del data["peers"][0]["public_key"]
        parse_config(data)
    except tomllib.TOMLDecodeError:
        raise UsageError("--name and --peer: no quotes, backslashes or line breaks in a name") from None
    except ConfigError as exc:
        raise UsageError(f"these options make a config the node refuses: {exc}") from None
    return text


def _arguments(parser: argparse.ArgumentParser) -> None:
    def option(flag: str, key: str, metavar: str, what: str) -> None:
        parser.add_argument(
            flag, dest=key, metavar=metavar, default=DEFAULTS[key], help=f"{what} (default: {DEFAULTS[key]})"
        )

    option("--name", "name", "NAME", "this node's name: the key file is NAME.key")
    option("--peer", "peer", "NAME", "the peer's name")
    option("--address", "address", "CIDR", "this node's tunnel address and subnet ([interface] address)")
    option("--peer-address", "peer_address", "IP", "the peer's tunnel address (its allowed_ips)")
    option("--endpoint", "endpoint", "HOST:PORT", "where the peer listens, as reached from this host")


def _run(args: argparse.Namespace) -> int:
    print(render(args.name, args.peer, args.address, args.peer_address, args.endpoint), end="")
    return EXIT_OK


COMMAND = Subcommand(
    name="example-config",
    help="print a commented starting config for a node (vpn-packet example-config > node-a.toml)",
    description=(
        "Prints a complete node config, every key commented: [interface], [listen], [node] with a key\n"
        "file, one [[peers]] entry, and the optional [tls], [tuning] and [resilience] tables commented\n"
        "out. Run `vpn-packet genkey NAME` for the key file and paste the peer's public key over the\n"
        "PASTE placeholder: until then the node refuses the file, naming that line.\n\n"
        "  vpn-packet example-config > node-a.toml\n"
        "  vpn-packet example-config --name node-b --peer node-a --address 10.8.0.2/24 \\\n"
        "      --peer-address 10.8.0.1 --endpoint 192.168.77.1:7000 > node-b.toml"
    ),
    add_arguments=_arguments,
    run=_run,
)
