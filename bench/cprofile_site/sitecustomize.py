"""cProfile for a whole service process when BENCH_CPROFILE_DIR is set (federation_bench --profile)."""

# On PYTHONPATH of the processes to profile; each writes BENCH_CPROFILE_DIR/<pid>.prof when it exits cleanly.

from __future__ import annotations

import atexit
import cProfile
import os

_directory = os.environ.get("BENCH_CPROFILE_DIR")
if _directory:
    _profile = cProfile.Profile()

    def _dump() -> None:
        _profile.disable()
        _profile.dump_stats(os.path.join(_directory, f"{os.getpid()}.prof"))

    atexit.register(_dump)
    _profile.enable()
