"""Summarize a py-spy ``--format raw`` profile (collapsed stacks, ``--threads``): per thread, its samples grouped
by the first ``depth`` frames of their stacks, most first.

    python3 bench/spy_summary.py PROFILE[.gz] [depth]
"""

from __future__ import annotations

import collections
import gzip
import sys


def main() -> None:
    path, depth = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 12
    opener = gzip.open if path.endswith(".gz") else open
    threads: collections.Counter = collections.Counter()
    stacks: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with opener(path, "rt") as fh:
        for line in fh:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            threads[frames[0]] += int(count)
            stacks[frames[0]][" > ".join(f.split(" (")[0] for f in frames[1:depth + 1])] += int(count)
    for thread, total in threads.most_common(8):
        print(f"== {thread}: {total} samples")
        for key, n in stacks[thread].most_common(25):
            print(f"  {n:6d}  {key[-220:]}")


if __name__ == "__main__":
    main()
