"""The Ray Serve layer of ray-lipsync, one job per module (`serve_app.py` is its entry point).

    clients      GatewayAPI clients generated from the interface: ServeClient (the whole
                 deployment, through a DeploymentHandle) and HomeClient (inside a replica)
    routing      SessionRouter: a session's requests to its home replica, new ones to the
                 least loaded
    autoscaling  GatewayLoadAutoscalingPolicy: gateways for the measured load and open sessions
    board        the MetricsBoard actor and BoardReader (/metrics of every gateway)
    deployment   GatewayDeployment, build_app, build (the application builder)
    run          `ray-lipsync serve`: start Ray + Serve, block, shut down on SIGINT/SIGTERM

Not to be confused with `ray.serve`: modules here import it as `from ray import serve` and
each other relatively, so the two never meet in one name.
"""
