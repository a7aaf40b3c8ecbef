"""The benchmarks are not run by `make test`, so at least every module of bench/ must import: a refactor of the
services must not leave `make bench` broken until someone next runs it."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import bench

MODULES = sorted(m.name for m in pkgutil.iter_modules(bench.__path__, "bench.") if not m.name.endswith("sitecustomize"))


def test_there_are_benchmarks() -> None:
    assert {"bench.suite", "bench.federation_bench", "bench.healthmonitor_bench"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_bench_module_imports(name: str) -> None:
    importlib.import_module(name)
