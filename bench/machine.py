"""The machine a benchmark ran on, in the words its report uses: CPU model, cores, CPU class, load."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_flags() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo (Linux); elsewhere the platform's processor name and no flags."""
    info = Path("/proc/cpuinfo")
    fields = dict(line.split(":", 1) for line in info.read_text().splitlines() if ":" in line) if info.is_file() else {}
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("model name", platform.processor()), set(fields.get("flags", "").split())


def cpu_class() -> str:
    """``avx512_bf16`` or ``AVX2-only``: the two CPU classes the reproducibility rules and the timings tell apart."""
    return "avx512_bf16" if "avx512_bf16" in cpu_flags()[1] else "AVX2-only"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load() -> str:
    """The 1/5/15-minute load averages, or ``n/a``."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def describe() -> str:
    """One line: model, cores, class."""
    return f"{cpu_flags()[0]}, {cores()} cores, {cpu_class()} (`lscpu | grep -o avx512_bf16`)"
