"""Shared fixtures: the real-packet corpus from ../shared (skipped, with the reason, when absent)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus" / "ip-packets.jsonl"

settings.register_profile("ci", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=150, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session")
def corpus() -> list[dict[str, Any]]:
    """Every record of shared/corpus/ip-packets.jsonl (3,420 real packets with expected answers)."""
    if not CORPUS.is_file():
        pytest.skip(f"real-packet corpus not found at {CORPUS} (it lives in ../shared beside the repo)")
    with CORPUS.open() as f:
        return [json.loads(line) for line in f]
