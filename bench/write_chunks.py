"""CPU time of writing a file into the page cache in one write() call against 1 MB calls.

Why ``flor_nb.disk.write_out`` writes in 1 MB calls: on this project's VMs (ext4) a single large write()
cost about ten times the CPU of the same bytes written in 1 MB pieces, and that CPU (in the saver process
or the writer thread) is taken from training on a 2-core machine. Reads showed no such difference.

    .venv/bin/python bench/write_chunks.py [--reps 5] [--dir DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from common import machine


def write_cpu(folder: str, data: memoryview, chunk: int, n: int) -> float:
    """CPU seconds of this thread to write ``data`` to a new file in calls of ``chunk`` bytes. The file is
    kept (as checkpoint blobs are) until the folder is cleared."""
    path = os.path.join(folder, f"w{chunk}-{len(data)}-{n}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.thread_time()
        for offset in range(0, len(data), chunk):
            os.write(fd, data[offset:offset + chunk])
        return time.thread_time() - start
    finally:
        os.close(fd)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", default=None, help="a folder on the disk to measure (default: a temp folder here)")
    a = p.parse_args(argv)
    folder = tempfile.mkdtemp(dir=a.dir or os.path.dirname(os.path.abspath(__file__)))
    print(f"`bench/write_chunks.py --reps {a.reps}`; {machine()}; folder {folder}\n")
    print("| size | one write() | 1 MB writes | ratio (median of per-rep ratios) |\n|---|---|---|---|")
    try:
        for size_mb in (2, 8, 16, 64):
            data = memoryview(os.urandom(size_mb << 20))
            ones, chunked, ratios = [], [], []
            for n in range(a.reps):  # interleaved
                one, pieces = write_cpu(folder, data, len(data), n), write_cpu(folder, data, 1 << 20, n)
                ones.append(one), chunked.append(pieces), ratios.append(one / max(pieces, 1e-9))
            one, pieces = statistics.median(ones) * 1e3, statistics.median(chunked) * 1e3
            print(f"| {size_mb} MB | {one:.1f} ms | {pieces:.1f} ms | {statistics.median(ratios):.1f}x |")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
