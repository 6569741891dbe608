"""Assembly: the parts of `vpn_packet` and `vpn_packet.transport` put together into a running node.

- `node`: `Node`, a dispatcher, stream pool, TCP streams and receiver for one host, without a TUN device
  (runs without root: the demo, tests and benchmarks use it on loopback).
- `tun_node`: `TunNode` and `run_node`, a `Node` on a Linux TUN device, what `vpn-packet node` runs.
- `config`: the node's TOML configuration file, parsed into dataclasses (errors name the key).
- `metrics_endpoint`: /metrics (Prometheus, by `prometheus_client`) and /metrics.json over HTTP.
- `demo`: `vpn-packet demo`, two nodes on loopback.

Defaults and validation rules are not here but in `vpn_packet.tuning`, shared with the library classes.
Nothing is re-exported: importing `vpn_packet.node.config` (the CLI does, to parse a file) must not pull in
the whole data path.
"""
