"""Evaluate adapters on task files (same options as `hetero-ray eval`), e.g. as a Ray job:

    ray job submit --working-dir . -- python jobs/evaluate.py --base smollm2-135m --adapter out/fused \
        ../shared/data/uie/mit-movie_sample300.json --limit 50 --out runs/eval
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hetero_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
