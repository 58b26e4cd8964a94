"""Run one fusion as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/fuse.py SPEC.yaml [flags]

Inside a job RAY_ADDRESS points at the cluster, so the pipeline joins it; the same flags as
`hetero-ray fuse` apply. The last line printed starts with HETERO_RAY_RESULT and holds the output path.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds hetero_ray

from hetero_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["fuse", *sys.argv[1:]]))
