"""Turns pytest-benchmark JSON into the markdown tables of benches/README.md.

Usage: python benches/report.py RESULT.json [RESULT.json ...]
Per group, each row gives the median time per item (extra_info `packets_per_round` or `ops_per_round`, else
per call) and how many times slower it is than the fastest of our rows (named `vpn_packet...`, or marked with
extra_info `ours`).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Any


def _per_item_ns(bench: dict[str, Any]) -> float:
    extra = bench.get("extra_info", {})
    n = extra.get("packets_per_round") or extra.get("ops_per_round") or 1
    return float(bench["stats"]["median"]) * 1e9 / n


def _name(bench: dict[str, Any]) -> str:
    return str(bench["name"]).removeprefix("test_")


def _is_ours(bench: dict[str, Any]) -> bool:
    return "vpn_packet" in _name(bench) or bool(bench.get("extra_info", {}).get("ours"))


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
        ours = [_per_item_ns(b) for b in benches if _is_ours(b)]
        base = min(ours) if ours else None
        out += [
            f"### {group}",
            "",
            "| implementation | per item | items/s | vs ours |",
            "|---|---:|---:|---:|",
        ]
        for bench in sorted(benches, key=_per_item_ns):
            ns = _per_item_ns(bench)
            per = f"{ns / 1000:.2f} µs" if ns >= 1000 else f"{ns:.1f} ns"
            if not base:
                ratio = ""
            elif ns > base * 1.0001:
                ratio = f"{ns / base:.1f}x slower"
            elif ns < base * 0.9999:
                ratio = f"{base / ns:.1f}x faster"
            else:
                ratio = "1.0x"
            out.append(f"| {_name(bench)} | {per} | {1e9 / ns / 1e6:.2f} M | {ratio} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(sys.argv[1:]))
