"""Ray actors that place the ray_lipsync core on a cluster (thin shells over the core).

- `FeatureBatcherActor`: session audio -> VAD -> per-frame features, batched across sessions.
- `InferenceReplica`: one per GPU (CPU fallback); runs an `Engine` (streaming/engine.py).
- `CompositorActor`: one per node; turns the crops its replicas render into mouth patches.
- `SessionDirectory`: starts the actors and pins sessions to replicas; every decision is
  `ray_lipsync.placement.Placement`'s.
- `RayPipeline`: the session API (`streaming.pipeline.Pipeline`) on top of them, used by the
  Serve gateway.
"""
