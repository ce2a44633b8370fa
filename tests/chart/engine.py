"""Adapter between the chart tests (tests/chart/main.rs) and two real engines: Helm's Go SDK
(helm-python-sdk) and the Kubernetes schemas (kubernetes-validate).

Reads one JSON request on stdin, writes one JSON answer on stdout:

  request:  {"chart": dir, "values": {...}, "release": name, "namespace": ns,
             "kube_versions": ["1.30", ...]}
  answer:   {"schema_error": str|null, "render_error": str|null,
             "lint": {"errors": [...], "messages": [{"severity", "path", "error"}]},
             "notes": str,
             "objects": [{"source": template path or "crds/…", "object": {...},
                          "validation": {version: null (valid) | "error text" | "no schema: …"}}]}

Assertions live in the Rust tests; this file only runs the engines.
"""
import json
import sys

import helm_python as helm
import kubernetes_validate
import yaml


def validate(obj, versions):
    results = {}
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
            results[version] = None
        except kubernetes_validate.SchemaNotFoundError as e:
            results[version] = "no schema: " + e.message
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            results[version] = f"{path}: {e.message}"
    return results


def objects_of(source, text, versions):
    found = []
    for doc in yaml.safe_load_all(text):
        if doc:
            found.append({"source": source, "object": doc, "validation": validate(doc, versions)})
    return found


def main():
    request = json.load(sys.stdin)
    values = request.get("values") or {}
    versions = request.get("kube_versions") or []
    answer = {"schema_error": None, "render_error": None, "lint": None, "notes": "", "objects": []}
    with helm.Chart.load(request["chart"]) as chart:
        try:
            chart.validate_schema(values)
        except helm.HelmError as e:
            answer["schema_error"] = str(e)
        try:
            rendered = chart.render(values, name=request["release"], namespace=request["namespace"],
                                    is_install=True)
        except helm.HelmError as e:
            answer["render_error"] = str(e)
            rendered = {}
        for path, text in sorted(rendered.items()):
            if path.endswith("NOTES.txt"):
                answer["notes"] = text
            else:
                answer["objects"].extend(objects_of(path, text, versions))
        for crd in chart.crds:
            answer["objects"].extend(objects_of(crd["name"], crd["data"], versions))
    answer["lint"] = helm.lint(request["chart"], values, strict=True, namespace=request["namespace"])
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
