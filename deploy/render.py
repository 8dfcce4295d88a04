#!/usr/bin/env python3
"""Keeps the Kubernetes manifests in step with deploy/serve.yaml, and renders them without kustomize.

    python deploy/render.py            # rewrite generated parts (base serveConfigV2, overlay patches)
    python deploy/render.py --check    # exit 1 if anything generated is stale (CI)
    python deploy/render.py build deploy/kuberay/overlays/h100-tp2 | kubectl apply -f -

deploy/serve.yaml is the one source of truth for the Serve config: the base RayService's
serveConfigV2 is that file verbatim. Each overlay has a hand-edited values.yaml (model, tensor
parallelism, replica bounds, GPU type) from which this script writes patch.generated.yaml, a JSON
6902 patch that kustomize (`kubectl apply -k`) applies to the base. `build` is a small stand-in
for `kustomize build` covering the features these manifests use (resources, JSON 6902 patches,
images, namespace); it needs only PyYAML.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
SERVE_YAML = DEPLOY / "serve.yaml"
KUBERAY = DEPLOY / "kuberay"
BASE_RAYSERVICE = KUBERAY / "base" / "rayservice.yaml"
OVERLAYS = KUBERAY / "overlays"
PATCH_NAME = "patch.generated.yaml"

WORKER = "/spec/rayClusterConfig/workerGroupSpecs/0"
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
VALUE_KEYS = {"model", "tensor_parallel_size", "min_replicas", "max_replicas", "accelerator",
              "cpu_per_gpu", "memory_gi_per_gpu", "engine"}


class RenderError(Exception):
    """A manifest, overlay or kustomization that cannot be rendered, with the reason."""


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the embedded Serve config) as readable `|` blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


# --- base: serveConfigV2 = deploy/serve.yaml -------------------------------------------------

_BLOCK_HEADER = re.compile(r"^(?P<indent> *)serveConfigV2: \|[-+]?\s*$")


def with_serve_config(manifest: str, serve_text: str) -> str:
    """The manifest text with its `serveConfigV2: |` block replaced by serve_text, comments kept."""
    lines = manifest.splitlines(keepends=True)
    for i, line in enumerate(lines):
        match = _BLOCK_HEADER.match(line)
        if match:
            break
    else:
        raise RenderError("no `serveConfigV2: |` block in the manifest")
    header_indent = len(match["indent"])
    end = i + 1
    while end < len(lines) and (not lines[end].strip() or
                                len(lines[end]) - len(lines[end].lstrip(" ")) > header_indent):
        end += 1
    # Blank lines at the block's end belong to the layout around it, not to the block.
    while end > i + 1 and not lines[end - 1].strip():
        end -= 1
    pad = " " * (header_indent + 2)
    body = [pad + text if text.strip() else "\n" for text in serve_text.splitlines(keepends=True)]
    if not serve_text.endswith("\n"):
        raise RenderError("deploy/serve.yaml must end with a newline")
    return "".join(lines[: i + 1] + body + lines[end:])


# --- overlays: values.yaml -> JSON 6902 patch ------------------------------------------------


def overlay_serve_config(serve: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """deploy/serve.yaml's config with an overlay's model, tp, engine settings and replica bounds."""
    config = copy.deepcopy(serve)
    app = config["applications"][0]
    app["args"]["model"] = values["model"]
    app["args"]["tensor_parallel_size"] = values["tensor_parallel_size"]
    app["args"].setdefault("engine", {}).update(values.get("engine") or {})
    for deployment in app["deployments"]:
        if deployment["name"] == "ReplicaGroup":
            deployment["autoscaling_config"]["min_replicas"] = values["min_replicas"]
            deployment["autoscaling_config"]["max_replicas"] = values["max_replicas"]
            break
    else:
        raise RenderError("deploy/serve.yaml has no ReplicaGroup deployment")
    return config


def overlay_patch(serve: dict[str, Any], values: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON 6902 operations that turn the base RayService into the overlay's."""
    unknown = set(values) - VALUE_KEYS
    missing = {"model", "tensor_parallel_size", "min_replicas", "max_replicas", "accelerator"} - set(values)
    if unknown or missing:
        raise RenderError(f"values.yaml: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    tp = values["tensor_parallel_size"]
    if not (isinstance(tp, int) and tp >= 1):
        raise RenderError(f"values.yaml: tensor_parallel_size must be an integer >= 1, got {tp!r}")
    if not 0 <= values["min_replicas"] <= values["max_replicas"]:
        raise RenderError("values.yaml: need 0 <= min_replicas <= max_replicas")
    cpu = tp * int(values.get("cpu_per_gpu", 8))
    memory = f"{tp * int(values.get('memory_gi_per_gpu', 64))}Gi"
    resources = {"cpu": str(cpu), "memory": memory, "nvidia.com/gpu": tp}
    config_text = (
        "# Generated by deploy/render.py from deploy/serve.yaml and this overlay's values.yaml.\n"
        + yaml.safe_dump(overlay_serve_config(serve, values), sort_keys=False)
    )
    accelerator_path = f"{WORKER}/template/spec/nodeSelector/{ACCELERATOR_LABEL.replace('/', '~1')}"
    return [
        {"op": "replace", "path": "/spec/serveConfigV2", "value": config_text},
        {"op": "replace", "path": f"{WORKER}/replicas", "value": values["min_replicas"]},
        {"op": "replace", "path": f"{WORKER}/minReplicas", "value": values["min_replicas"]},
        {"op": "replace", "path": f"{WORKER}/maxReplicas", "value": values["max_replicas"]},
        {"op": "replace", "path": accelerator_path, "value": values["accelerator"]},
        {"op": "replace", "path": f"{WORKER}/template/spec/containers/0/resources",
         "value": {"requests": dict(resources), "limits": dict(resources)}},
    ]


def generated_files() -> dict[Path, str]:
    """Every generated file and the content it should have now."""
    serve_text = SERVE_YAML.read_text()
    serve = yaml.safe_load(serve_text)
    files = {BASE_RAYSERVICE: with_serve_config(BASE_RAYSERVICE.read_text(), serve_text)}
    for values_file in sorted(OVERLAYS.glob("*/values.yaml")):
        patch = overlay_patch(serve, yaml.safe_load(values_file.read_text()))
        files[values_file.parent / PATCH_NAME] = (
            "# Generated by deploy/render.py from values.yaml and deploy/serve.yaml; do not edit.\n"
            + yaml.dump(patch, Dumper=_BlockDumper, sort_keys=False)
        )
    return files


# --- a small kustomize build -----------------------------------------------------------------

_SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "patches", "images", "namespace"}


def _split_pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer must start with '/': {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _container(doc: Any, parts: list[str], path: str) -> tuple[Any, str]:
    node = doc
    for part in parts[:-1]:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise RenderError(f"patch path {path!r} does not exist") from None
    return node, parts[-1]


def apply_json6902(doc: Any, operations: list[dict[str, Any]]) -> Any:
    """Apply JSON 6902 add/replace/remove/test operations (what kustomize applies to CRDs)."""
    doc = copy.deepcopy(doc)
    for op in operations:
        kind, path = op.get("op"), op.get("path", "")
        parent, key = _container(doc, _split_pointer(path), path)
        if isinstance(parent, list):
            index = len(parent) if key == "-" else int(key)
            if kind == "add":
                parent.insert(index, copy.deepcopy(op["value"]))
                continue
            if not 0 <= index < len(parent):
                raise RenderError(f"patch path {path!r} does not exist")
        elif kind != "add" and key not in parent:
            raise RenderError(f"patch path {path!r} does not exist")
        if kind in ("add", "replace"):
            parent[index if isinstance(parent, list) else key] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[index if isinstance(parent, list) else key]
        elif kind == "test":
            if parent[index if isinstance(parent, list) else key] != op["value"]:
                raise RenderError(f"patch test failed at {path!r}")
        else:
            raise RenderError(f"unsupported patch operation {kind!r}")
    return doc


def _set_images(node: Any, images: list[dict[str, str]]) -> None:
    """kustomize's images transformer: rewrite every containers[].image whose name matches."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    image = container.get("image", "")
                    name, tag = (image.rsplit(":", 1) + [""])[:2] if ":" in image.split("/")[-1] else (image, "")
                    for rule in images:
                        if rule["name"] == name:
                            name = rule.get("newName", name)
                            tag = rule.get("newTag", tag)
                            container["image"] = f"{name}:{tag}" if tag else name
            _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def _matches(doc: dict[str, Any], target: dict[str, str]) -> bool:
    meta = doc.get("metadata", {})
    return all(
        (field != "kind" or doc.get("kind") == value) and (field != "name" or meta.get("name") == value)
        for field, value in target.items()
    ) and set(target) <= {"kind", "name"}


def build(directory: Path) -> list[dict[str, Any]]:
    """The documents `kustomize build directory` would print, for the features used here."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - _SUPPORTED_KEYS
    if unsupported:
        raise RenderError(f"{directory}: unsupported kustomization keys {sorted(unsupported)}")
    docs: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            docs.extend(build(path))
        elif path.is_file():
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
        else:
            raise RenderError(f"{directory}: resource {resource!r} not found")
    for patch in kustomization.get("patches", []):
        text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
        operations = yaml.safe_load(text)
        if not isinstance(operations, list):
            raise RenderError(f"{directory}: only JSON 6902 patches (a list of operations) are supported")
        target = patch.get("target") or {}
        hits = [i for i, d in enumerate(docs) if _matches(d, target)]
        if not hits:
            raise RenderError(f"{directory}: patch target {target} matches no resource")
        for i in hits:
            docs[i] = apply_json6902(docs[i], operations)
    if kustomization.get("images"):
        for doc in docs:
            _set_images(doc, kustomization["images"])
    if "namespace" in kustomization:
        for doc in docs:
            doc.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a generated file is stale")
    sub = parser.add_subparsers(dest="command")
    build_parser = sub.add_parser("build", help="print the rendered manifests of a kustomize directory")
    build_parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    if args.command == "build":
        yaml.dump_all(build(args.directory), sys.stdout, Dumper=_BlockDumper, sort_keys=False)
        return 0
    stale = [path for path, text in generated_files().items()
             if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"stale: {path.relative_to(DEPLOY.parent)} (run python deploy/render.py)", file=sys.stderr)
        return 1 if stale else 0
    for path, text in generated_files().items():
        if path in stale:
            path.write_text(text)
            print(f"wrote {path.relative_to(DEPLOY.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
