"""Parallel execution: strategies as rule tables, plans, executors and the automatic planner.

* ``rules``     -- logical axis -> mesh axis tables (data, tensor, pipeline); ``logical_sharding``.
* ``placement`` -- :class:`Placement`: every sharding of one model on one mesh, from the rules.
* ``plan``      -- :class:`Plan` (dp x tp x pp, micro-batches, dtype, stage split, rules).
* ``executor``  -- :class:`MeshExecutor`: one SPMD mesh (single device, dp, tp, dp x tp).
* ``pipeline``  -- :class:`PipelineExecutor`: stages on sub-meshes, micro-batches in flight.
* ``kernels``   -- which Pallas kernels a decode step calls, placed on the mesh.
* ``lookup``    -- the token lookup from a vocabulary-split embedding table, placed.
* ``build``     -- sharded loading under a plan into an executor (``build_executor``).
* ``devices``   -- device descriptions and presets (V100-16GB ... H200-141GB), clusters.
* ``analysis``  -- abstract compiles (no weights) read through XLA's memory/cost analyses.
* ``planner``   -- enumerate plans, roofline cost model, choose; ``PlanReport.to_frame()``;
  ``build_parallel`` for ``get_model("alpa/")``.
"""

from optkit.parallel.build import build_executor
from optkit.parallel.devices import DEVICE_PRESETS, Cluster, DeviceSpec
from optkit.parallel.executor import MeshExecutor
from optkit.parallel.pipeline import PipelineExecutor
from optkit.parallel.placement import Placement
from optkit.parallel.plan import Plan, PlanError
from optkit.parallel.planner import PlanReport, auto_plan, build_parallel
from optkit.parallel.rules import DEFAULT_RULES, TENSOR_RULES

__all__ = ["DEFAULT_RULES", "DEVICE_PRESETS", "TENSOR_RULES", "Cluster", "DeviceSpec",
           "MeshExecutor", "PipelineExecutor", "Placement", "Plan", "PlanError", "PlanReport",
           "auto_plan", "build_executor", "build_parallel"]
