"""hetero-ray: fuse LoRA experts trained on different LLM families into one adapter for a target model
(HeteroFusion), orchestrated with Ray and DeepSpeed."""

from hetero_ray.client import FusionClient, FusionOutput, fuse, run
from hetero_ray.errors import AdapterError, FamilyError, HeteroRayError, SpecError
from hetero_ray.spec import FusionSpec, load_spec, parse_spec
from hetero_ray.sweep import SweepRun, grid, run_sweep

__version__ = "0.1.0"
__all__ = [
    "AdapterError", "FamilyError", "FusionClient", "FusionOutput", "FusionSpec", "HeteroRayError", "SpecError",
    "SweepRun", "fuse", "grid", "load_spec", "parse_spec", "run", "run_sweep",
]
