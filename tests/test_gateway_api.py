"""Every implementation of GatewayAPI has the interface's exact signatures: a method added to
the Protocol but not to the Serve clients (or with other defaults) fails here, not in a cluster."""

from __future__ import annotations

import inspect

import pytest

from ray_lipsync.api.client import SESSION_METHODS, GatewayAPI
from ray_lipsync.api.gateway import Gateway

serve_app = pytest.importorskip("serve_app")

METHODS = [name for name, value in vars(GatewayAPI).items()
           if inspect.isfunction(value) and not name.startswith("_")]


@pytest.mark.parametrize("implementation", [Gateway, serve_app.HomeClient, serve_app.ServeClient,
                                            serve_app.GatewayDeployment.func_or_class])
def test_signatures_agree_with_the_interface(implementation):
    for name in METHODS:
        expected = inspect.signature(getattr(GatewayAPI, name))
        actual = inspect.signature(getattr(implementation, name))
        assert actual == expected, f"{implementation.__name__}.{name}{actual} != GatewayAPI.{name}{expected}"


def test_session_methods_take_session_id_as_a_keyword():
    assert set(SESSION_METHODS) <= set(METHODS)
    for name in SESSION_METHODS:
        assert "session_id" in inspect.signature(getattr(GatewayAPI, name)).parameters
