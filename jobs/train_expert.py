"""Train one LoRA expert (same options as `hetero-ray expert`):

    python jobs/train_expert.py --base smollm2-135m --task ../shared/data/uie/mit-movie_sample300.json \
        --out adapters/smollm2-movie --steps 120 --lr 5e-4
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hetero_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["expert", *sys.argv[1:]]))
