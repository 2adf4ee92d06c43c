"""mofo_jax: the momentum-filtered optimizer (MoFO) as an optax transformation.

MoFO (Chen et al., arXiv 2407.20999) fine-tunes with Adam but moves, in every parameter block,
only the entries of largest momentum magnitude, so the model forgets less of what it knew.
"""

from mofo_jax._approx import ApproxSelection
from mofo_jax._counts import value as count_value
from mofo_jax._local import LocalSelection
from mofo_jax._local import local_selection
from mofo_jax._pallas_approx import PallasApproxSelection
from mofo_jax._pallas_selection import PallasSelection
from mofo_jax._partition import BlockSpec
from mofo_jax._selection import BlockSelection
from mofo_jax._selection import MomentUpdate
from mofo_jax._selection import ExactSelection
from mofo_jax._selection import Selection
from mofo_jax._selection import resolve_method
from mofo_jax._selection import select_blocks
from mofo_jax._selection import select_momentum
from mofo_jax._selection import top_fraction_mask
from mofo_jax._sharding import state_shardings
from mofo_jax._telemetry import MoFOTelemetry
from mofo_jax._telemetry import read_telemetry
from mofo_jax._telemetry import telemetry_summary
from mofo_jax._transform import KeepTopFractionState
from mofo_jax._triton_selection import TritonSelection
from mofo_jax._transform import ScaleByMoFOState
from mofo_jax._transform import keep_top_fraction
from mofo_jax._transform import mofo
from mofo_jax._transform import resolve_selection
from mofo_jax._transform import scale_by_mofo

__version__ = "0.1.0"

__all__ = [
  "ApproxSelection",
  "BlockSelection",
  "BlockSpec",
  "ExactSelection",
  "KeepTopFractionState",
  "LocalSelection",
  "MoFOTelemetry",
  "MomentUpdate",
  "PallasApproxSelection",
  "PallasSelection",
  "ScaleByMoFOState",
  "Selection",
  "count_value",
  "keep_top_fraction",
  "local_selection",
  "mofo",
  "read_telemetry",
  "resolve_method",
  "resolve_selection",
  "scale_by_mofo",
  "select_blocks",
  "select_momentum",
  "state_shardings",
  "telemetry_summary",
  "top_fraction_mask",
  "TritonSelection",
]
