"""Turn a CustomResourceDefinition into the JSON schema (draft 2020-12) of one of its versions, the
way the API server would check a custom object: `nullable` admits null, `x-kubernetes-int-or-string`
admits an integer or a string, and an object whose schema lists its properties refuses any other
(the API server would prune an unknown field without a word; a test should fail on it instead),
unless it is marked `x-kubernetes-preserve-unknown-fields`. Descriptions are dropped.

    python deploy/schemas/crd_to_jsonschema.py CRD.yaml VERSION OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def convert(node: Any) -> Any:
    if isinstance(node, list):
        return [convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: convert(v) for k, v in node.items() if k != "description" and not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node:
        out["properties"] = {name: convert(sub) for name, sub in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def crd_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema = convert(entry["schema"]["openAPIV3Schema"])
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
            schema["properties"]["kind"] = {"const": kind}
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
            return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": f"{kind} {group}/{version}",
                    **schema}  # fmt: skip
    raise SystemExit(f"{crd['metadata']['name']} has no version {version}")


def main() -> None:
    source, version, target = sys.argv[1:4]
    crd = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
    text = json.dumps(crd_schema(crd, version), indent=1, sort_keys=True) + "\n"
    Path(target).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
