"""Ray actors that place the ray_lipsync core on a cluster.

- `FeatureBatcherActor`: session audio -> VAD -> per-frame features, batched across sessions.
- `InferenceReplica`: one per GPU (CPU fallback); cross-session render batches.
- `CompositorActor`: pastes crops into full frames on the node that streams the session.
- `SessionDirectory`: creates the actors, pins sessions to replicas, re-pins on failure.
- `RayPipeline`: the session API on top of them (used by the Serve gateway).
"""
