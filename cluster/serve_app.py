"""The Serve application builder for Serve config files (a KubeRay RayService's ``serveConfigV2``).

A Serve config names an application by ``import_path`` and passes it ``args``; Serve
calls the builder with those args. kvmesh's args carry one deployment config, the same
mapping as a ``configs/*.yaml`` file::

    applications:
      - name: kvmesh
        route_prefix: /
        import_path: cluster.serve_app:app_builder
        args:
          config: {name: kvmesh, model: /models/Llama-3.1-8B-Instruct, engine: {...}, ...}

The config is validated by ``router.config.parse_deployment_config`` when Serve builds
the application, so a bad config fails the deployment with the loader's message. The
``http`` section is ignored here: the Serve config's ``http_options`` decide the port.
"""

from __future__ import annotations

from typing import Any

from router.config import DeploymentConfig, parse_deployment_config

ARGS_KEYS = frozenset({"config"})


def parse_serve_args(args: Any, source: str = "serveConfigV2 args") -> DeploymentConfig:
    """The ``DeploymentConfig`` in a Serve application's ``args``; ``ValueError`` if invalid."""
    if not isinstance(args, dict):
        raise ValueError(f"{source}: expected a mapping with key 'config', got {type(args).__name__}")
    unknown = sorted(set(args) - ARGS_KEYS)
    if unknown or "config" not in args:
        raise ValueError(f"{source}: expected exactly the key 'config' (a kvmesh deployment config), "
                         f"got {sorted(args)}")
    return parse_deployment_config(args["config"], source=f"{source}.config")


def app_builder(args: dict) -> Any:
    """Serve's entry point: ``import_path: cluster.serve_app:app_builder``."""
    from router.app import build_app
    return build_app(parse_serve_args(args))
