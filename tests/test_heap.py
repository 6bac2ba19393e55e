"""scgpt_train/heap.py: glibc's mmap threshold fixed, so freed activations go back to the system (issue 27 item 3).

Observed through glibc itself (``mallinfo2().hblks``, the blocks that have their own mapping), in fresh
interpreters: after a 4 MiB block is freed, glibc's dynamic threshold serves the next 4 MiB from the heap, where
it stays; with the threshold fixed at 1 MiB the next one is mapped again and unmapped on free."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys

import pytest
from conftest import ROOT

from scgpt_train.heap import set_mmap_threshold

PROBE = """
import ctypes, sys
from scgpt_train.heap import set_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
done = set_mmap_threshold(None if sys.argv[1] == "null" else int(sys.argv[1]))
libc.free(libc.malloc(4 << 20))  # glibc's dynamic threshold rises to 4 MiB here
before = libc.mallinfo2().hblks
block = libc.malloc(4 << 20)
print(libc.mallinfo2().hblks - before, done)
"""


def probe(threshold: str, env: dict | None = None) -> tuple[int, str]:
    """(mapped blocks the second 4 MiB allocation added, what set_mmap_threshold reported) in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, threshold], cwd=ROOT, capture_output=True, text=True, env=env, check=True
    )
    mapped, said = done.stdout.strip().split(" ", 1)
    return int(mapped), said


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="glibc's malloc with mallinfo2 (glibc >= 2.33) only",
)
def test_a_fixed_threshold_maps_large_blocks_where_glibcs_default_reuses_the_heap():
    import os

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    assert probe("null", env) == (0, "left to glibc's dynamic threshold (malloc_mmap_threshold=null)")
    assert probe(str(1 << 20), env) == (1, "fixed at 1048576 bytes")
    # the user's own MALLOC_MMAP_THRESHOLD_ is left as glibc read it (here: a threshold above the 4 MiB block)
    mapped, said = probe(str(1 << 20), {**env, "MALLOC_MMAP_THRESHOLD_": str(8 << 20)})
    assert mapped == 0 and said == f"left to glibc (MALLOC_MMAP_THRESHOLD_={8 << 20} in the environment)"


def test_an_out_of_range_threshold_is_refused():
    with pytest.raises(ValueError, match="malloc_mmap_threshold=-1 must be between 0 and 33554432 bytes or null"):
        set_mmap_threshold(-1)
