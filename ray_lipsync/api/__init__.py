"""The HTTP / WebRTC service layer: gateway core, FastAPI routes, auth, events, metrics.

`gateway.Gateway` holds a replica's sessions and peers (no Ray); `routes.build_api` builds the
FastAPI ingress over a `client.GatewayClient` (in-process or through a Serve handle);
`router` holds the Ray Serve session-affine request router and autoscaling policy.
"""
