"""Turns pytest-benchmark JSON into the markdown tables of benches/README.md.

Usage: python benches/report.py RESULT.json [RESULT.json ...]
Per group, each row gives the median time per item (extra_info `packets_per_round`, or per operation) and how
many times slower it is than the fastest vpn_packet row of the group.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Any


def _per_item_ns(bench: dict[str, Any]) -> float:
    n = bench.get("extra_info", {}).get("packets_per_round", 1)
    return float(bench["stats"]["median"]) * 1e9 / n


def _name(bench: dict[str, Any]) -> str:
    param = bench.get("param")
    return str(param) if param else str(bench["name"]).removeprefix("test_")


def render(paths: list[str]) -> str:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    machine = ""
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        info = data.get("machine_info", {})
        machine = f"{info.get('cpu', {}).get('brand_raw', '?')}, Python {info.get('python_version', '?')}"
        for bench in data["benchmarks"]:
            groups[bench.get("group") or "ungrouped"].append(bench)
    out = [f"Machine: {machine}", ""]
    for group, benches in groups.items():
        ours = [_per_item_ns(b) for b in benches if _name(b).startswith("vpn_packet")]
        base = min(ours) if ours else None
        out += [
            f"### {group}",
            "",
            "| implementation | per item | items/s | vs vpn_packet |",
            "|---|---:|---:|---:|",
        ]
        for bench in sorted(benches, key=_per_item_ns):
            ns = _per_item_ns(bench)
            per = f"{ns / 1000:.2f} µs" if ns >= 1000 else f"{ns:.1f} ns"
            ratio = f"{ns / base:.1f}x slower" if base and ns > base * 1.0001 else ("1.0x" if base else "")
            out.append(f"| {_name(bench)} | {per} | {1e9 / ns / 1e6:.2f} M | {ratio} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(sys.argv[1:]))
