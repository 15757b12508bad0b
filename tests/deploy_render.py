"""Render the Kubernetes deployment offline: the Helm chart (through helm-python-sdk, Helm's own
engine in a shared library, no binary and no cluster) and the kustomize overlays (a small builder of
the few kustomization fields deploy/k8s uses, cross-checked against `kubectl kustomize` where one is
installed), each into a list of plain objects.

    from tests.deploy_render import render_chart, kustomize_build
    objects = render_chart("gpu")            # deploy/helm/moorage/ci/gpu-values.yaml
    objects = kustomize_build("production")  # deploy/k8s/overlays/production
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = ROOT / "deploy" / "helm" / "moorage"
K8S_DIR = ROOT / "deploy" / "k8s"
SCHEMAS_DIR = ROOT / "deploy" / "schemas"
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
# the release and namespace the tests render with (and deploy/k8s/base is rendered with)
RELEASE = "moorage"
NAMESPACE = "moorage"


def value_sets() -> list[str]:
    """Names of the chart's value sets: ci/NAME-values.yaml."""
    return sorted(p.name.removesuffix("-values.yaml") for p in (CHART_DIR / "ci").glob("*-values.yaml"))


def overlays() -> list[str]:
    return sorted(p.parent.name for p in (K8S_DIR / "overlays").glob("*/kustomization.yaml"))


def load_values(value_set: str) -> dict[str, Any]:
    return yaml.safe_load((CHART_DIR / "ci" / f"{value_set}-values.yaml").read_text(encoding="utf-8")) or {}


@functools.cache
def _chart() -> Any:
    from helm_python import Chart

    return Chart.load(CHART_DIR)


def render_chart(
    values: str | dict[str, Any] | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """Every object the chart renders for a value set (a name under ci/) or a values mapping.
    Helm validates the values against values.schema.json first (HelmValuesError)."""
    if isinstance(values, str):
        values = load_values(values)
    manifests = _chart().render(values=values or {}, name=release, namespace=namespace)
    objects: list[dict[str, Any]] = []
    for path in sorted(manifests):
        if path.endswith(".yaml"):
            objects.extend(doc for doc in yaml.safe_load_all(manifests[path]) if doc)
    return objects


# ---- kustomize ----------------------------------------------------------------------------------
# The fields deploy/k8s uses, and nothing else (anything more is refused, so an overlay cannot use a
# field this builder would silently skip): resources (files or folders), patches (JSON 6902, from a
# file or inline, selected by kind and exact name), images (newName / newTag by image name).
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}


def kustomize_build(overlay: str | Path) -> list[dict[str, Any]]:
    """The objects `kustomize build` makes of an overlay (a name under deploy/k8s/overlays or a folder)."""
    folder = Path(overlay) if isinstance(overlay, Path) else K8S_DIR / "overlays" / overlay
    return _build(folder)


def _build(folder: Path) -> list[dict[str, Any]]:
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
    unknown = set(spec) - KUSTOMIZATION_FIELDS
    if unknown:
        raise ValueError(f"{folder}/kustomization.yaml: {sorted(unknown)} not supported by tests/deploy_render.py")
    objects: list[dict[str, Any]] = []
    for resource in spec.get("resources", []):
        path = folder / resource
        if path.is_dir():
            objects.extend(_build(path))
        else:
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc)
    objects = copy.deepcopy(objects)
    for patch in spec.get("patches", []):
        objects = _apply_patch(folder, patch, objects)
    for image in spec.get("images", []):
        for container in _containers(objects):
            _set_image(container, image)
    return objects


def _apply_patch(folder: Path, patch: dict[str, Any], objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ops = patch.get("patch")
    ops = yaml.safe_load(ops) if ops is not None else yaml.safe_load((folder / patch["path"]).read_text("utf-8"))
    target = patch["target"]
    matched = 0
    out = []
    for obj in objects:
        if obj["kind"] == target["kind"] and obj["metadata"]["name"] == target["name"]:
            obj = jsonpatch.apply_patch(obj, ops)
            matched += 1
        out.append(obj)
    if not matched:
        raise ValueError(f"{folder}: patch target {target} matches no object")
    return out


def _containers(objects: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        yield from pod.get("initContainers", [])
        yield from pod.get("containers", [])


def _set_image(container: dict[str, Any], image: dict[str, Any]) -> None:
    name, tag = re.fullmatch(r"([^:@]+)(?::([^@]+))?(@.+)?", container["image"]).group(1, 2)  # type: ignore[union-attr]
    if name != image["name"]:
        return
    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
