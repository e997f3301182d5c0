"""The machine a benchmark ran on, for bench/results/*.json: CPU model and the vector
extensions that change the numbers (AVX-512, AVX-512 BF16, AMX, AVX2), cores, load."""

from __future__ import annotations

import os
import platform
import subprocess
import time

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = "", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name" and not model:
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.SubprocessError):
        pass
    if not flags:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                    elif line.startswith("model name") and not model:
                        model = line.split(":", 1)[1].strip()
        except OSError:
            pass
    return model or platform.processor() or platform.machine(), [f for f in FLAGS if f in flags]


def machine() -> dict:
    model, flags = cpu_model_and_flags()
    return {
        "cpu": model,
        "cpu_flags": flags,  # of FLAGS, those present
        "avx512": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "avx2": "avx2" in flags,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d"),
    }
