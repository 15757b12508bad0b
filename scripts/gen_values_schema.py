"""Write deploy/helm/moorage/values.schema.json: the chart's own keys, and under `settings` the JSON
schema of moorage's settings tree (`Settings.model_json_schema()`), so `helm install` refuses a
mistyped setting or a value of the wrong type the way `moorage serve` would, before any pod starts.

Secret settings (``SecretStr``: security.master_key, config.api_key) are left out of `settings`: they
belong in the chart's Secret (`secret.*`), never in a ConfigMap.

    python scripts/gen_values_schema.py          # write the file
    python scripts/gen_values_schema.py --check  # exit 1 if the committed file differs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from moorage.config import Settings

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "moorage" / "values.schema.json"

STR = {"type": "string"}
BOOL = {"type": "boolean"}
INT0 = {"type": "integer", "minimum": 0}
INT1 = {"type": "integer", "minimum": 1}
OBJ = {"type": "object"}
LIST = {"type": "array"}
OBJ_LIST = {"type": "array", "items": {"type": "object"}}
STR_LIST = {"type": "array", "items": {"type": "string"}}
QUANTITY = {"type": ["string", "integer"]}
RESOURCES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "requests": {"type": "object", "additionalProperties": QUANTITY},
        "limits": {"type": "object", "additionalProperties": QUANTITY},
    },
}
PLACEMENT = {"nodeSelector": {"type": "object", "additionalProperties": STR}, "tolerations": OBJ_LIST, "affinity": OBJ}
SCALING_POLICY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "value", "periodSeconds"],
    "properties": {"type": {"enum": ["Pods", "Percent"]}, "value": INT1, "periodSeconds": INT1},
}
SCALING_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "tolerance": QUANTITY,
        "policies": {"type": "array", "items": SCALING_POLICY},
    },
}
BEHAVIOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"scaleUp": SCALING_RULES, "scaleDown": SCALING_RULES},
}


def obj(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A closed object: a mistyped key is an error, not a silently ignored value."""
    return {"type": "object", "additionalProperties": False, "properties": properties, **extra}


def chart_schema() -> dict[str, Any]:
    worker = {"enabled": BOOL, "replicas": INT0, "extraArgs": STR_LIST, "resources": RESOURCES, **PLACEMENT}
    return obj(
        {
            "global": OBJ,  # Helm passes it to every chart
            "image": obj(
                {
                    "repository": {"type": "string", "minLength": 1},
                    "tag": STR,
                    "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                }
            ),  # fmt: skip
            "imagePullSecrets": OBJ_LIST,
            "nameOverride": STR,
            "fullnameOverride": STR,
            "settings": {"$ref": "#/$defs/Settings"},
            "secret": obj({"existingSecret": STR, "masterKey": STR, "databaseUrl": STR, "required": BOOL}),
            "env": OBJ_LIST,
            "envFrom": OBJ_LIST,
            "serviceAccount": obj({"create": BOOL, "name": STR, "annotations": OBJ}),
            "podSecurityContext": OBJ,
            "securityContext": OBJ,
            "scratch": obj({"homeSizeLimit": QUANTITY, "tmpSizeLimit": QUANTITY}),
            "server": obj(
                {
                    **worker,
                    "preStopSleepSeconds": INT0,
                    "probes": obj(
                        {
                            "periodSeconds": INT1,
                            "timeoutSeconds": INT1,
                            "readinessFailureThreshold": INT1,
                            "livenessFailureThreshold": INT1,
                        }
                    ),
                    "podAnnotations": OBJ,
                    "podLabels": OBJ,
                }
            ),
            "service": obj(
                {"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "port": INT1, "annotations": OBJ}
            ),  # fmt: skip
            "streamWorker": obj(
                {**worker, "source": STR, "model": STR, "sink": STR, "terminationGracePeriodSeconds": INT0}
            ),
            "jobsWorker": obj({**worker, "kinds": STR_LIST, "terminationGracePeriodSeconds": INT0}),
            "podDisruptionBudget": obj({"enabled": BOOL, "maxUnavailable": {"type": ["integer", "string"]}}),
            "topologySpread": obj(
                {
                    "enabled": BOOL,
                    "maxSkew": INT1,
                    "whenUnsatisfiable": {"enum": ["ScheduleAnyway", "DoNotSchedule"]},
                    "topologyKeys": STR_LIST,
                }
            ),
            "gpu": obj(
                {
                    "enabled": BOOL,
                    "resourceName": STR,
                    "count": INT1,
                    "imageTagSuffix": STR,
                    "shmSizeLimit": QUANTITY,
                    "nodeSelector": PLACEMENT["nodeSelector"],
                    "tolerations": OBJ_LIST,
                }
            ),
            "tls": obj({"enabled": BOOL, "secretName": STR}),
            "autoscaling": obj(
                {
                    "enabled": BOOL,
                    "engine": {"enum": ["hpa", "keda"]},
                    "server": obj(
                        {
                            "minReplicas": INT1,
                            "maxReplicas": INT1,
                            "targetQueueDepth": {"type": "number", "exclusiveMinimum": 0},
                            "behavior": BEHAVIOR,
                        }
                    ),  # fmt: skip
                    "streamWorker": obj(
                        {
                            "minReplicas": INT1,
                            "maxReplicas": INT1,
                            "targetLagPerReplica": {"type": "number", "exclusiveMinimum": 0},
                            "behavior": BEHAVIOR,
                        }
                    ),  # fmt: skip
                    "keda": obj({"prometheusAddress": STR, "pollingInterval": INT1, "cooldownPeriod": INT0}),
                }
            ),
            "serviceMonitor": obj(
                {
                    "enabled": BOOL,
                    "interval": STR,
                    "labels": OBJ,
                    "authorization": obj({"name": STR, "key": STR}),
                }
            ),
            "prometheusRule": obj({"enabled": BOOL, "labels": OBJ}),
        }
    )


def settings_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """Settings' schema and its $defs, without the secret fields."""
    schema = Settings.model_json_schema()
    defs = schema.pop("$defs")
    for section in [schema, *defs.values()]:
        for name, field in list(section.get("properties", {}).items()):
            if _is_secret(field):
                del section["properties"][name]
    return schema, defs


def _is_secret(field: dict[str, Any]) -> bool:
    variants = field.get("anyOf", [field])
    return any(v.get("format") == "password" for v in variants)


def build() -> dict[str, Any]:
    settings, defs = settings_schema()
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "moorage chart values"}
    schema.update(chart_schema())
    schema["$defs"] = {"Settings": settings, **defs}
    return schema


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if SCHEMA_PATH.read_text(encoding="utf-8") != text:
            print(f"{SCHEMA_PATH} is out of date: run python scripts/gen_values_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
