"""The HTTP / WebRTC service layer: gateway core, FastAPI routes, auth, events, metrics.

`gateway.Gateway` holds a replica's sessions and peers (no Ray); `routes.build_api` builds the
FastAPI app over a `client.GatewayAPI` (a Gateway in-process, or serve.clients.HomeClient
inside a gateway replica);
The Serve request router and autoscaling policy live with the Serve application (serve/routing.py, serve/autoscaling.py).
"""
