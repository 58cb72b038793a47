"""The full benchmark: every config, every optimizer, results into benchmarks/results/.

    python benchmarks/run.py                 # all configs (several minutes)
    python benchmarks/run.py --config "64 tensors" --only bf16

Run it on a quiet machine (nothing else heavy running): the optimizers are interleaved
and the bandwidth is measured in the same run, but a busy machine still skews both.
The same code runs behind ``adamkit bench``.
"""

import sys
from pathlib import Path

from adamkit.bench import main

if __name__ == "__main__":
    # results/ unless --out names another directory: first, so that any --out given
    # comes later and wins (`--out=DIR` was missed, and went into results/)
    sys.exit(main(["--out", str(Path(__file__).parent / "results"), *sys.argv[1:]]))
