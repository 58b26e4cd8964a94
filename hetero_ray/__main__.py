"""``python -m hetero_ray``: the ``hetero-ray`` command."""

from hetero_ray.cli import run

run()
