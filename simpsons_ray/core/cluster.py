"""What the Ray cluster is and can become: its nodes now, and the node types its autoscaler may add.

An autoscaling cluster (the cluster launcher, KubeRay, Ray's local fake autoscaler)
publishes its node types in the GCS; Ray Train and Ray Data read them there to
size themselves, and so does this project: a snapshot of ``ray.cluster_resources()``
taken at start-up says nothing of the nodes an autoscaler adds later (cluster.yaml
starts its workers at 0).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeType:
    """One kind of node the autoscaler may start: its resources, and how many at most (-1: no limit)."""

    name: str
    resources: dict[str, float] | None  # None: not in the config (the cloud provider fills them in when nodes start)
    max_count: int


# Written by `ray up` on the head node of a cluster-launcher cluster, where `ray job
# submit` runs the driver; its autoscaler (v1) reads it and publishes nothing in the GCS.
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"


def node_types() -> list[NodeType] | None:
    """The autoscaler's node types, or None when the cluster has no autoscaler this can see (a local Ray, a fixed cluster).

    Autoscaler v2 (KubeRay, and the launcher with it on) publishes them in the
    GCS; the cluster launcher's v1 autoscaler reads them from its config on the head.
    """
    try:
        import ray._private.state  # the call Ray Train and Ray Data make; there is no public one yet

        config = ray._private.state.state.get_cluster_config()
    except Exception as exc:  # an older or newer Ray without it
        logger.debug("no cluster config in the GCS: %s", exc)
        config = None
    if config is not None and config.node_group_configs:
        return [NodeType(g.name, dict(g.resources), int(g.max_count)) for g in config.node_group_configs]
    return _launcher_node_types(os.path.expanduser(LAUNCHER_CONFIG))


def _launcher_node_types(path: str) -> list[NodeType] | None:
    if not os.path.exists(path):
        return None
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        count = 1 if name == config.get("head_node_type") else int(spec.get("max_workers", config.get("max_workers", 0)))
        resources = spec.get("resources")
        types.append(NodeType(name, {k: float(v) for k, v in resources.items()} if resources else None, count))
    return types or None


def can_add(resource: str, types: list[NodeType] | None) -> bool:
    """Whether the autoscaler has a node type with this resource (or of unknown resources) that it may start."""
    return any((t.resources is None or t.resources.get(resource, 0) > 0) and t.max_count != 0 for t in types or [])


def node_cpus() -> float:
    """CPUs of the largest node there is, or that the autoscaler may start."""
    import ray

    alive = [n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    typed = [t.resources.get("CPU", 0.0) for t in node_types() or [] if t.max_count != 0 and t.resources]
    return float(max(alive + typed + [0.0]))


def max_cpus() -> float:
    """CPUs the cluster has now, or may have at most once its autoscaler has added every node it may."""
    import ray

    now = float(ray.cluster_resources().get("CPU", 0.0))
    types = node_types()
    if not types:
        return now
    known = [(t.resources or {}, t.max_count) for t in types if t.resources is not None]
    if any(count < 0 and resources.get("CPU", 0) > 0 for resources, count in known):
        return float("inf")
    return max(now, sum(resources.get("CPU", 0.0) * count for resources, count in known))
