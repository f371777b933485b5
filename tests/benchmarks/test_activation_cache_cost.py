"""Tests for benchmarks/activation_cache_cost.py's memory measurement (the benchmark itself needs ../shared)."""

from __future__ import annotations

import os
import sys

import yaml

import activation_cache_cost
import bench_repo
from tlpipe.core.config import parse_params
from tlpipe.ops.recipes import apply_recipe, load_recipe, recipe_path

# a child that holds 300 MiB of its own memory and 200 MiB of a memory-mapped file, both touched, for 2 s
CHILD = """
import mmap, sys, time
anon = bytearray(300 * 2**20); anon[::4096] = b"a" * len(anon[::4096])
with open(sys.argv[1], "wb") as f:
    f.truncate(200 * 2**20)
with open(sys.argv[1], "r+b") as f:
    mapped = mmap.mmap(f.fileno(), 0)
    mapped[::4096] = b"m" * len(mapped[::4096])
    time.sleep(2)
"""


def test_the_peaks_tell_a_mapped_file_from_the_process_own_memory(tmp_path):
    cmd = [sys.executable, "-c", CHILD, str(tmp_path / "mapped.bin")]
    row = activation_cache_cost.measure_with_peaks(cmd, tmp_path, dict(os.environ), tmp_path / "child.log")
    assert row["peak_rss_mib"] > 500  # wait4's peak counts both
    assert 300 <= row["peak_rss_anon_mib"] < 450
    assert 200 <= row["peak_rss_file_mib"] < 350


def test_each_benchmark_recipe_sets_up_a_valid_params_file():
    # what recipe_repo writes: params.yaml, then `tlpipe recipe NAME`, then the params that point at the data
    for dataset, (recipe, data, point_at) in bench_repo.RECIPES.items():
        text = (bench_repo.REPO / "params.yaml").read_text()
        text = apply_recipe(text, load_recipe(recipe_path(recipe, bench_repo.REPO / "recipes")))
        params = bench_repo.apply_overrides(yaml.safe_load(text), point_at(f"data/sources/{data.name}"))
        assert parse_params(params, dataset).augment.image_size > 0
