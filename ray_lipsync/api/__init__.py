"""The HTTP / WebRTC service layer: gateway core, FastAPI routes, auth, events, metrics.

`gateway.Gateway` holds a replica's sessions and peers (no Ray); `routes.build_api` builds the
FastAPI app over a `client.GatewayClient` (in-process, through a Serve handle, or both:
`HomeClient` inside a gateway replica);
`router` holds the Ray Serve session-affine request router and autoscaling policy.
"""
