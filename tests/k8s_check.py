"""Render deploy/k8s (kustomize) and check the objects against the binaries and the gateway's code.

The Kubernetes half of tests/compose_check.py: no cluster is run, the manifests are rendered with
`kubectl kustomize` (Debian's kubernetes-client; `make kubectl` installs it) and checked.

For the base and every overlay under deploy/k8s/overlays/, asserts:
- every object is valid against the Kubernetes OpenAPI schemas, strictly (no unknown field), of
  1.27 (the oldest release with GA gRPC probes) and of the newest release the PyPI package
  `kubernetes-validate` bundles (`make kubectl` installs it in the pyenv; without it this part
  is skipped with a warning);
- every SecureLLM container runs one of the binaries (or the `install` of the secrets init
  container), and every flag it passes is in that binary's `--help`; all use the one image the
  kustomize `images:` entry `securellm` resolves to;
- listen flags bind 0.0.0.0 on a declared containerPort, and every containerPort is listened on;
- every probe's port is a port of its container: gRPC probes on the service's gRPC --listen port,
  HTTP probes on the gateway's --http-listen port; the gateway's readiness probe hits the route
  served by `ready` in services/securellm-gateway/src/http/mod.rs and its liveness probe a route
  that does not depend on the node agent;
- Service selectors match exactly one workload and their targetPorts resolve to its containers;
  every --backend / --registry / --scheduler address reaches, through a Service or the pod's
  loopback, a container of the right binary listening on that port;
- the node agent: a DaemonSet with the three node services in one pod, shareProcessNamespace,
  a GPU-node selector, a toleration for nvidia.com/gpu, the GPUs requested by exactly one container
  (the backend manager), models mounted read-only where the registry and the manager read them;
- every container (init containers and PostgreSQL included): uid/gid 10001, runAsNonRoot,
  read-only root filesystem, no privilege escalation, not privileged, ALL capabilities dropped
  and none added, seccomp RuntimeDefault; no host namespaces; no service account token mounted;
- secrets: no Secret object with data in the render; nothing secret-looking (token, password,
  key, PEM, URL with credentials, long hex) in a ConfigMap or a literal env value; every
  referenced Secret / ConfigMap (and key) exists in the render or is listed in
  deploy/k8s/README.md "Secrets the operator provides"; the internal token file is one path in a
  memory emptyDir the secrets init container fills (mode 0400) from Secret volumes; every
  `/run/securellm/secrets/...` path in the TOML is installed there; each binary's
  `--check-config` accepts the rendered TOML;
- NetworkPolicies: a default deny for ingress and egress; every policy selects some pods; the node
  agent's gRPC ports are reachable only from the gateway's pods; the gateway's HTTP port is open to
  all; the gateway may reach the node agent on every port it dials, DNS and PostgreSQL; an
  in-cluster PostgreSQL only from the gateway;
- the gateway: a Deployment with >= 2 replicas, an HPA on it with minReplicas >= 2, requests and
  limits on every container, SECURELLM_DATABASE_URL from a Secret or without credentials.

Then it mutation-checks itself: a copy of deploy/k8s with one fault each (a flag, a port, a probe
path, a missing GPU toleration, a ConfigMap secret, ...) must fail.

Skips LOUDLY (a warning on stderr, exit 0) only when kubectl is not installed. $KUBECTL names
another kubectl (the manifests render with kustomize v2.0.3, Debian 12's kubectl 1.20, and v5).

Usage: python tests/k8s_check.py [BIN_DIR]   (default: $CARGO_TARGET_DIR or target, /debug)
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN_DIR = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "debug")
SERVICES = ("vram-scheduler", "registry", "backend-manager", "securellm-gateway")
NODE_SERVICES = ("vram-scheduler", "registry", "backend-manager")
# Which binary answers at the address a flag names.
DIALS = {"--scheduler": "vram-scheduler", "--registry": "registry", "--backend": "backend-manager"}
UID = 10001
WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job")


def kubectl():
    if os.environ.get("KUBECTL"):
        return os.environ["KUBECTL"]
    return shutil.which("kubectl") or ("/usr/bin/kubectl" if os.access("/usr/bin/kubectl", os.X_OK) else None)


_help = {}


def help_text(binary):
    if binary not in _help:
        _help[binary] = subprocess.run([os.path.join(BIN_DIR, binary), "--help"], capture_output=True,
                                       text=True, check=True).stdout
    return _help[binary]


def has_flag(binary, flag):
    return re.search(rf"(^|\s){re.escape(flag)}[\s=<,]", help_text(binary)) is not None


def gateway_routes():
    """(every GET path the gateway's HTTP router serves, the path served by `ready`)."""
    src = open(os.path.join(ROOT, "services/securellm-gateway/src/http/mod.rs")).read()
    routes = set(re.findall(r'\.route\(\s*"(/[^"]*)"', src))
    ready = re.findall(r'\.route\(\s*"(/[^"]*)",\s*get\(ready\)\s*\)', src)
    return routes, (ready[0] if len(ready) == 1 else None)


def matches(selector, labels):
    """A LabelSelector (matchLabels + matchExpressions) against labels; {} matches everything."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        k, op, vals = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and k in labels and labels[k] in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def args_of(c):
    cmd = (c.get("command") or []) + (c.get("args") or [])
    return cmd, dict(zip(cmd[1::2], cmd[2::2]))


def binary_of(c):
    cmd = (c.get("command") or []) + (c.get("args") or [])
    return os.path.basename(cmd[0]) if cmd else None


def port_of(addr):
    return int(addr.rsplit(":", 1)[-1])


def resolve_port(container, port):
    """A probe's / Service's port (number or name) as the container's port number, or None."""
    for p in container.get("ports") or []:
        if port == p.get("name") or port == p.get("containerPort"):
            return p["containerPort"]
    return None


SECRET_KEY = re.compile(r"(token|passw|secret|api_?key|private|credential|signing_key)", re.I)
SECRET_TEXT = [
    (re.compile(r"-----BEGIN [A-Z ]*(PRIVATE KEY|CERTIFICATE)-----"), "a PEM block"),
    (re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@\"']+:[^@\s/\"']+@"), "a URL with credentials"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), "an API key (sk-...)"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"), "a JWT"),
    (re.compile(r"\b[0-9a-fA-F]{32,}\b"), "a long hex string (a token?)"),
    (re.compile(r"(?im)^\s*[\w.-]*(password|passwd|secret|token|api_?key)\s*[=:]\s*\S"), "a secret-looking assignment"),
]


def secret_looking_text(text):
    return [what for rx, what in SECRET_TEXT if rx.search(text)]


def secret_looking_toml(doc, path=""):
    """Keys of a TOML document that hold a secret by name (`*_file` / `*_env` name one)."""
    found = []
    for k, v in doc.items():
        p = f"{path}.{k}" if path else k
        if isinstance(v, dict):
            found += secret_looking_toml(v, p)
        elif SECRET_KEY.search(k) and not re.search(r"_(file|files|env)$", k):
            found.append(p)
    return found


def operator_secrets(k8s_dir):
    """{secret name: {keys}} from deploy/k8s/README.md's "Secrets the operator provides" table."""
    text = open(os.path.join(k8s_dir, "README.md")).read()
    m = re.search(r"^## Secrets the operator provides\n(.*?)(^## |\Z)", text, re.S | re.M)
    out = {}
    for line in (m.group(1) if m else "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`") and cells[1].startswith("`"):
            out.setdefault(cells[0].strip("`"), set()).add(cells[1].strip("`"))
    return out


def expected_image(k8s_dir, overlay):
    """The image the `securellm` kustomize entry resolves to (the overlay's entry over the base's)."""
    entry = None
    for d in (os.path.join(k8s_dir, "base"), overlay):
        if d is None:
            continue
        k = yaml.safe_load(open(os.path.join(d, "kustomization.yaml")))
        for e in k.get("images") or []:
            if e.get("name") == "securellm":
                entry = e
    if entry is None:
        return None
    name = entry.get("newName", "securellm")
    return f"{name}@{entry['digest']}" if entry.get("digest") else f"{name}:{entry.get('newTag', 'latest')}"


SCHEMA_VERSIONS = ["1.27.0"]
try:
    import kubernetes_validate
    _schemas = os.listdir(os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema"))
    SCHEMA_VERSIONS.append(max((s[1:].split("-")[0] for s in _schemas if s.endswith("-local-strict")),
                               key=lambda v: tuple(int(x) for x in v.split("."))))
except ImportError:
    kubernetes_validate = None


def check_schema(objs, err):
    """Each object against the strict OpenAPI schemas of SCHEMA_VERSIONS."""
    if kubernetes_validate is None:
        return
    for o in objs:
        for v in SCHEMA_VERSIONS:
            try:
                kubernetes_validate.validate(o, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                err(f"{o['kind']}/{o['metadata'].get('name')}: not valid for Kubernetes {v}: {e.message} at "
                    f"{'/'.join(str(x) for x in e.path)}")
            except Exception as e:  # no schema for this kind / version
                err(f"{o['kind']}/{o['metadata'].get('name')}: cannot validate for Kubernetes {v}: {e}")


def check_render(objs, k8s_dir, overlay, err):
    """Every check on one rendered overlay (`objs`); `err(msg)` records a failure."""
    check_schema(objs, err)
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    workloads = [o for o in objs if o["kind"] in WORKLOAD_KINDS]
    pods = [(w, w["spec"]["template"]) for w in workloads]
    name_of = lambda w: f"{w['kind']}/{w['metadata']['name']}"
    routes, ready_path = gateway_routes()
    if ready_path is None:
        err("cannot find the gateway's `ready` route in services/securellm-gateway/src/http/mod.rs")
    image = expected_image(k8s_dir, overlay)
    if image is None:
        err("no kustomize `images:` entry named `securellm`")

    # One namespace for everything namespaced.
    nss = {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"}
    if len(nss) != 1 or None in nss:
        err(f"every object must be in one namespace, got {nss}")

    def containers(tpl, init=True):
        spec = tpl["spec"]
        return (spec.get("initContainers") or [] if init else []) + (spec.get("containers") or [])

    # Where each service binary runs.
    runs = {}
    for w, tpl in pods:
        for c in containers(tpl, init=False):
            if binary_of(c) in SERVICES:
                runs.setdefault(binary_of(c), []).append((w, tpl, c))
    for b in SERVICES:
        if len(runs.get(b, [])) != 1:
            err(f"{b} must run in exactly one container, got {len(runs.get(b, []))}")
    if any(len(runs.get(b, [])) != 1 for b in SERVICES):
        return

    # --- Containers: binaries, flags, image, listen ports, probes.
    for w, tpl in pods:
        for c in containers(tpl):
            where = f"{name_of(w)}/{c['name']}"
            b = binary_of(c)
            cmd, args = args_of(c)
            is_ours = b in SERVICES or b == "securellm" or b == "install"
            if c.get("image", "").split("/")[-1].split(":")[0].split("@")[0] == "securellm" or is_ours:
                if not is_ours:
                    err(f"{where}: runs {b!r}, not a SecureLLM binary")
                if image and c.get("image") != image:
                    err(f"{where}: image {c.get('image')!r}, the `securellm` images: entry gives {image!r}")
            if b in SERVICES or b == "securellm":
                for flag in [a for a in cmd[1:] if a.startswith("--")]:
                    if not has_flag(b, flag):
                        err(f"{where}: flag {flag} is not in `{b} --help`")
            if b not in SERVICES:
                continue
            listened = set()
            for flag in ("--listen", "--http-listen", "--metrics-listen"):
                if flag in args:
                    if not args[flag].startswith("0.0.0.0:"):
                        err(f"{where}: {flag} must bind 0.0.0.0 in a pod, got {args[flag]!r}")
                    p = port_of(args[flag])
                    listened.add(p)
                    if resolve_port(c, p) is None:
                        err(f"{where}: {flag} port {p} is not a containerPort")
            for p in c.get("ports") or []:
                if p["containerPort"] not in listened:
                    err(f"{where}: containerPort {p['containerPort']} ({p.get('name')}) is listened on by no flag")
            grpc_port = port_of(args.get("--listen", ":0"))
            http_port = port_of(args["--http-listen"]) if "--http-listen" in args else None
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.get(kind)
                if probe is None:
                    if kind != "startupProbe":
                        err(f"{where}: no {kind}")
                    continue
                if "grpc" in probe:
                    if probe["grpc"].get("port") != grpc_port:
                        err(f"{where}: {kind} gRPC port {probe['grpc'].get('port')} is not its --listen port {grpc_port}")
                elif "httpGet" in probe:
                    hp = resolve_port(c, probe["httpGet"].get("port"))
                    if hp is None or hp != http_port:
                        err(f"{where}: {kind} HTTP port {probe['httpGet'].get('port')} is not its --http-listen port {http_port}")
                    path = probe["httpGet"].get("path")
                    if path not in routes:
                        err(f"{where}: {kind} path {path} is not a route of the gateway ({sorted(routes)})")
                    if kind == "readinessProbe" and path != ready_path:
                        err(f"{where}: readinessProbe must hit the gateway's ready route {ready_path}, got {path}")
                    if kind != "readinessProbe" and path == ready_path:
                        err(f"{where}: {kind} on {path}: a node agent that is down would restart every gateway")
                elif "tcpSocket" in probe:
                    if resolve_port(c, probe["tcpSocket"].get("port")) is None:
                        err(f"{where}: {kind} tcpSocket port is not a containerPort")
                else:
                    err(f"{where}: {kind} is neither gRPC nor HTTP")
            if b == "securellm-gateway" and (c.get("readinessProbe") or {}).get("httpGet") is None:
                err(f"{where}: the gateway's readinessProbe must be HTTP GET {ready_path}")

    # --- Services.
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    svc_target = {}
    for name, s in services.items():
        sel = s["spec"].get("selector") or {}
        hits = [(w, tpl) for w, tpl in pods if sel and all(tpl["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
        if len(hits) != 1:
            err(f"Service/{name}: selector {sel} matches {len(hits)} workloads, must match one")
            continue
        w, tpl = hits[0]
        for sp in s["spec"].get("ports") or []:
            tp = sp.get("targetPort", sp["port"])
            found = [(c, resolve_port(c, tp)) for c in containers(tpl, init=False) if resolve_port(c, tp) is not None]
            if not found:
                err(f"Service/{name}: targetPort {tp} is no containerPort of {name_of(w)}")
            else:
                svc_target[(name, sp["port"])] = (w, tpl, found[0][0], found[0][1])

    # --- Addresses the services dial.
    for b in SERVICES:
        w, tpl, c = runs[b][0]
        _, args = args_of(c)
        for flag, want in DIALS.items():
            if flag not in args:
                continue
            host, port = args[flag].rsplit(":", 1)
            port = int(port)
            target_w, target_tpl, target_c = runs[want][0]
            target_port = port_of(args_of(target_c)[1].get("--listen", ":0"))
            if host in ("127.0.0.1", "localhost", "::1"):
                if target_w is not w:
                    err(f"{b}: {flag} {args[flag]} is loopback but {want} runs in {name_of(target_w)}, not in its pod")
                elif port != target_port:
                    err(f"{b}: {flag} port {port} but {want} listens on {target_port}")
            else:
                svc = host.split(".")[0]
                t = svc_target.get((svc, port))
                if svc not in services:
                    err(f"{b}: {flag} {args[flag]} names no Service")
                elif t is None:
                    err(f"{b}: {flag} {args[flag]}: Service/{svc} has no port {port} reaching a container")
                elif binary_of(t[2]) != want or t[3] != target_port:
                    err(f"{b}: {flag} {args[flag]} reaches {binary_of(t[2])}:{t[3]}, not {want}:{target_port}")

    # --- The node agent.
    node_w, node_tpl, _ = runs["vram-scheduler"][0]
    spec = node_tpl["spec"]
    for b in NODE_SERVICES:
        if runs[b][0][0] is not node_w:
            err(f"{b} must run in the node agent's pod ({name_of(node_w)}), not {name_of(runs[b][0][0])}")
    if node_w["kind"] != "DaemonSet":
        err(f"the node agent must be a DaemonSet, is a {node_w['kind']}")
    if spec.get("shareProcessNamespace") is not True:
        err("node agent: shareProcessNamespace must be true (NVML's PIDs)")
    sel = (spec.get("nodeSelector") or {}).get("securellm.dev/gpu-node") == "true"
    aff = any(e.get("key") == "securellm.dev/gpu-node"
              for t in (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                        .get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms", [])
              for e in t.get("matchExpressions") or [])
    if not (sel or aff):
        err("node agent: no nodeSelector / required node affinity on securellm.dev/gpu-node")
    if not any(t.get("key") == "nvidia.com/gpu" and t.get("effect") in (None, "", "NoSchedule")
               for t in spec.get("tolerations") or []):
        err("node agent: no toleration for nvidia.com/gpu (NoSchedule)")
    gpu = [(c["name"], (c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu"),
            (c.get("resources") or {}).get("requests", {}).get("nvidia.com/gpu")) for c in containers(node_tpl)]
    holders = [g for g in gpu if g[1] is not None]
    if len(holders) != 1 or holders[0][0] != "backend-manager" or int(holders[0][1]) < 1:
        err(f"node agent: exactly the backend-manager container must limit nvidia.com/gpu >= 1, got {holders}")
    elif holders[0][2] is not None and holders[0][2] != holders[0][1]:
        err(f"node agent: nvidia.com/gpu request {holders[0][2]} != limit {holders[0][1]}")
    vols = {v["name"]: v for v in spec.get("volumes") or []}
    _, reg_args = args_of(runs["registry"][0][2])
    models = reg_args.get("--models")
    for b in ("registry", "backend-manager"):
        c = runs[b][0][2]
        mounts = [m for m in c.get("volumeMounts") or [] if m["mountPath"] == models]
        if not mounts:
            err(f"node agent: {b} does not mount the models at {models}")
        elif not mounts[0].get("readOnly"):
            err(f"node agent: {b} mounts the models read-write")
        elif not ({"hostPath", "persistentVolumeClaim"} & set(vols.get(mounts[0]["name"], {}))):
            err(f"node agent: the models volume must be a hostPath or a PVC")

    # --- Security context of every container.
    for w, tpl in pods:
        pspec = tpl["spec"]
        psc = pspec.get("securityContext") or {}
        for k in ("hostPID", "hostNetwork", "hostIPC"):
            if pspec.get(k):
                err(f"{name_of(w)}: {k} must not be set")
        if pspec.get("automountServiceAccountToken") is not False:
            err(f"{name_of(w)}: automountServiceAccountToken must be false (no API access needed)")
        for c in containers(tpl):
            where = f"{name_of(w)}/{c['name']}"
            csc = c.get("securityContext") or {}
            eff = lambda k: csc.get(k, psc.get(k))
            if eff("runAsNonRoot") is not True:
                err(f"{where}: runAsNonRoot must be true")
            if eff("runAsUser") != UID or eff("runAsGroup") != UID:
                err(f"{where}: must run as {UID}:{UID}, got {eff('runAsUser')}:{eff('runAsGroup')}")
            if csc.get("readOnlyRootFilesystem") is not True:
                err(f"{where}: readOnlyRootFilesystem must be true")
            if csc.get("allowPrivilegeEscalation") is not False:
                err(f"{where}: allowPrivilegeEscalation must be false")
            if csc.get("privileged"):
                err(f"{where}: privileged")
            caps = csc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []) or caps.get("add"):
                err(f"{where}: capabilities must drop ALL and add none, got {caps}")
            if (eff("seccompProfile") or {}).get("type") != "RuntimeDefault":
                err(f"{where}: seccompProfile must be RuntimeDefault")
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(res.get(part) or {}):
                    err(f"{where}: resources.{part} must set cpu and memory")

    # --- Secrets and ConfigMaps.
    for s in by_kind.get("Secret", []):
        if s.get("data") or s.get("stringData"):
            err(f"Secret/{s['metadata']['name']} with data in the render: secrets are the operator's, never in git")
    cms = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    documented = operator_secrets(k8s_dir)
    tomls = []
    for name, cm in cms.items():
        for key, text in (cm.get("data") or {}).items():
            for what in secret_looking_text(text):
                err(f"ConfigMap/{name} {key}: holds {what}")
            if key.endswith(".toml"):
                try:
                    doc = tomllib.loads(text)
                except tomllib.TOMLDecodeError as e:
                    err(f"ConfigMap/{name} {key}: not TOML: {e}")
                    continue
                for p in secret_looking_toml(doc):
                    err(f"ConfigMap/{name} {key}: `{p}` holds a secret by its name (name a file: `*_file`)")
                tomls.append((name, key, text, doc))
        if cm.get("binaryData"):
            err(f"ConfigMap/{name}: binaryData cannot be checked for secrets")
    for w, tpl in pods:
        for c in containers(tpl):
            for e in c.get("env") or []:
                if "value" in e:
                    v = str(e["value"])
                    if secret_looking_text(v) or (SECRET_KEY.search(e["name"]) and v and not v.startswith("/")):
                        err(f"{name_of(w)}/{c['name']}: env {e['name']} has a literal secret-looking value")

    def refs(tpl):
        """(kind, name, key or None, where) of every Secret / ConfigMap the pod template uses."""
        out = []
        spec = tpl["spec"]
        for v in spec.get("volumes") or []:
            if "secret" in v:
                items = v["secret"].get("items") or [{"key": None}]
                out += [("Secret", v["secret"]["secretName"], i["key"], f"volume {v['name']}") for i in items]
            if "configMap" in v:
                items = v["configMap"].get("items") or [{"key": None}]
                out += [("ConfigMap", v["configMap"]["name"], i["key"], f"volume {v['name']}") for i in items]
            for src in (v.get("projected") or {}).get("sources") or []:
                for kind, field in (("Secret", "secret"), ("ConfigMap", "configMap")):
                    if field in src:
                        items = src[field].get("items") or [{"key": None}]
                        out += [(kind, src[field]["name"], i["key"], f"volume {v['name']}") for i in items]
        for s in spec.get("imagePullSecrets") or []:
            out.append(("Secret", s["name"], None, "imagePullSecrets"))
        for c in containers(tpl):
            for e in c.get("env") or []:
                vf = e.get("valueFrom") or {}
                if "secretKeyRef" in vf:
                    out.append(("Secret", vf["secretKeyRef"]["name"], vf["secretKeyRef"]["key"], f"env {e['name']}"))
                if "configMapKeyRef" in vf:
                    out.append(("ConfigMap", vf["configMapKeyRef"]["name"], vf["configMapKeyRef"]["key"], f"env {e['name']}"))
            for ef in c.get("envFrom") or []:
                if "secretRef" in ef:
                    out.append(("Secret", ef["secretRef"]["name"], None, "envFrom"))
                if "configMapRef" in ef:
                    out.append(("ConfigMap", ef["configMapRef"]["name"], None, "envFrom"))
        return out

    rendered_secrets = {s["metadata"]["name"]: s for s in by_kind.get("Secret", [])}
    for w, tpl in pods:
        for kind, name, key, where in refs(tpl):
            if kind == "ConfigMap":
                if name not in cms:
                    err(f"{name_of(w)} {where}: ConfigMap {name} is not in the render")
                elif key is not None and key not in (cms[name].get("data") or {}):
                    err(f"{name_of(w)} {where}: ConfigMap {name} has no key {key}")
            elif name not in rendered_secrets:
                if name not in documented:
                    err(f"{name_of(w)} {where}: Secret {name} is neither rendered nor listed in deploy/k8s/README.md")
                elif key is not None and key not in documented[name]:
                    err(f"{name_of(w)} {where}: Secret {name} key {key} is not the documented {sorted(documented[name])}")

    # The TOML: accepted by every binary; every file it names under the secrets dir is installed.
    for name, key, text, doc in tomls:
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(text)
        try:
            for b in SERVICES:
                r = subprocess.run([os.path.join(BIN_DIR, b), "--check-config", f.name], capture_output=True, text=True)
                if r.returncode != 0:
                    err(f"ConfigMap/{name} {key}: `{b} --check-config` refuses it: {(r.stdout + r.stderr).strip()}")
        finally:
            os.unlink(f.name)

    def mount_of(c, path):
        ms = [m for m in c.get("volumeMounts") or [] if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
        return max(ms, key=lambda m: len(m["mountPath"])) if ms else None

    token_paths = set()
    for b in SERVICES:
        w, tpl, c = runs[b][0]
        cmd, args = args_of(c)
        where = f"{name_of(w)}/{c['name']}"
        vols = {v["name"]: v for v in tpl["spec"].get("volumes") or []}
        cfg = args.get("--config")
        m = mount_of(c, cfg or "")
        if cfg is None or m is None or "configMap" not in vols.get(m["name"], {}):
            err(f"{where}: --config {cfg} is not on a ConfigMap volume")
        else:
            cm = cms.get(vols[m["name"]]["configMap"]["name"], {})
            if os.path.relpath(cfg, m["mountPath"]) not in (cm.get("data") or {}):
                err(f"{where}: --config {cfg}: the ConfigMap has no such key")
        tok = args.get("--internal-token-file")
        token_paths.add(tok)
        m = mount_of(c, tok or "")
        vol = vols.get(m["name"], {}) if m else {}
        if tok is None or (vol.get("emptyDir") or {}).get("medium") != "Memory":
            err(f"{where}: --internal-token-file {tok} must be on a memory emptyDir (filled from a Secret)")
            continue
        # The init container that fills that emptyDir: `install -m 0400 -t DIR SRC...`, every SRC
        # on a Secret volume.
        installed = set()
        for ic in tpl["spec"].get("initContainers") or []:
            icmd, _ = args_of(ic)
            im = [x for x in ic.get("volumeMounts") or [] if x["name"] == m["name"]]
            if not im or not icmd or os.path.basename(icmd[0]) != "install":
                continue
            mode = icmd[icmd.index("-m") + 1] if "-m" in icmd else None
            if mode is None or int(mode, 8) & 0o077:
                err(f"{name_of(w)}/{ic['name']}: install mode {mode}: the services refuse group/other access")
            if "-t" not in icmd or icmd[icmd.index("-t") + 1] != im[0]["mountPath"]:
                err(f"{name_of(w)}/{ic['name']}: must install into {im[0]['mountPath']} (-t)")
            skip = {i for i, a in enumerate(icmd) if a in ("-m", "-t")}
            for i, src in enumerate(icmd[1:], 1):
                if src.startswith("-") or i - 1 in skip:
                    continue
                sm = mount_of(ic, src)
                if sm is None or "secret" not in vols.get(sm["name"], {}):
                    err(f"{name_of(w)}/{ic['name']}: {src} is not on a Secret volume")
                installed.add(os.path.join(im[0]["mountPath"], os.path.basename(src)))
        if tok not in installed:
            err(f"{where}: --internal-token-file {tok} is not installed by an init container ({sorted(installed)})")
        if b == "securellm-gateway":
            for name, key, text, doc in tomls:
                for k, v in (doc.get("gateway") or {}).items():
                    if isinstance(v, str) and v.startswith(m["mountPath"] + "/") and v not in installed:
                        err(f"ConfigMap/{name}: gateway.{k} = {v} is not installed by the gateway's init container")
    if len(token_paths) != 1:
        err(f"the four services must use one --internal-token-file path: {token_paths}")

    # --- NetworkPolicies.
    nps = by_kind.get("NetworkPolicy", [])
    if not any(np["spec"].get("podSelector") == {} and {"Ingress", "Egress"} <= set(np["spec"].get("policyTypes") or [])
               and not np["spec"].get("ingress") and not np["spec"].get("egress") for np in nps):
        err("no default-deny NetworkPolicy (podSelector {}, Ingress and Egress, no rules)")
    labels_of = lambda tpl: tpl["metadata"].get("labels") or {}
    gw_w, gw_tpl, gw_c = runs["securellm-gateway"][0]
    for np in nps:
        if np["spec"].get("podSelector") != {} and not any(matches(np["spec"]["podSelector"], labels_of(t)) for _, t in pods):
            err(f"NetworkPolicy/{np['metadata']['name']}: its podSelector selects no pods")

    def rule_ports(rule, c_list):
        """The port numbers a rule opens (None: all), names resolved against the containers."""
        if not rule.get("ports"):
            return None
        out = set()
        for p in rule["ports"]:
            v = p.get("port")
            if v is None:
                return None
            if isinstance(v, str):
                out |= {x for c in c_list for x in [resolve_port(c, v)] if x}
            else:
                out |= set(range(v, p.get("endPort", v) + 1))
        return out

    def policies_for(tpl, ptype):
        return [np for np in nps if matches(np["spec"].get("podSelector"), labels_of(tpl))
                and ptype in (np["spec"].get("policyTypes") or ["Ingress"])]

    def only_gateway(peers):
        if not peers:
            return False
        for peer in peers:
            if set(peer) != {"podSelector"} or not matches(peer["podSelector"], labels_of(gw_tpl)):
                return False
            if any(matches(peer["podSelector"], labels_of(t)) for w, t in pods if w is not gw_w):
                return False
        return True

    node_grpc = {port_of(args_of(runs[b][0][2])[1].get("--listen", ":0")) for b in NODE_SERVICES}
    allowed_from_gw = set()
    for np in policies_for(node_tpl, "Ingress"):
        for rule in np["spec"].get("ingress") or []:
            ports = rule_ports(rule, containers(node_tpl, init=False))
            hit = node_grpc if ports is None else ports & node_grpc
            if hit and not only_gateway(rule.get("from")):
                err(f"NetworkPolicy/{np['metadata']['name']}: node agent ports {sorted(hit)} open to more than the gateway's pods: {rule.get('from')}")
            elif hit:
                allowed_from_gw |= hit
    if allowed_from_gw != node_grpc:
        err(f"NetworkPolicies: the gateway may not reach node agent ports {sorted(node_grpc - allowed_from_gw)}")
    http_port = port_of(args_of(gw_c)[1].get("--http-listen", ":0"))
    if not any(not rule.get("from") and (rule_ports(rule, [gw_c]) is None or http_port in rule_ports(rule, [gw_c]))
               for np in policies_for(gw_tpl, "Ingress") for rule in np["spec"].get("ingress") or []):
        err(f"NetworkPolicies: the gateway's HTTP port {http_port} is not open to clients")

    def egress_allows(src_tpl, dst_tpl, port, proto="TCP"):
        for np in policies_for(src_tpl, "Egress"):
            for rule in np["spec"].get("egress") or []:
                ports = rule_ports(rule, containers(dst_tpl, init=False) if dst_tpl else [])
                if ports is not None and port not in ports:
                    continue
                if rule.get("ports") and not any(p.get("protocol", "TCP") == proto for p in rule["ports"]):
                    continue
                to = rule.get("to")
                if not to:
                    return True
                for peer in to:
                    if dst_tpl is not None and set(peer) == {"podSelector"} and matches(peer["podSelector"], labels_of(dst_tpl)):
                        return True
                    if dst_tpl is None and ("ipBlock" in peer or "namespaceSelector" in peer):
                        return True
        return False

    _, gw_args = args_of(gw_c)
    for flag in DIALS:
        if flag in gw_args:
            t = svc_target.get((gw_args[flag].rsplit(":", 1)[0].split(".")[0], port_of(gw_args[flag])))
            if t and not egress_allows(gw_tpl, t[1], t[3]):
                err(f"NetworkPolicies: the gateway's egress to {gw_args[flag]} (pod port {t[3]}) is denied")
    if not egress_allows(gw_tpl, None, 53, "UDP"):
        err("NetworkPolicies: the gateway cannot resolve names (no egress to UDP 53)")
    pg = [(w, t) for w, t in pods if any(c.get("image", "").split("/")[-1].startswith("postgres") for c in containers(t))]
    if pg:
        pw, pt = pg[0]
        if not egress_allows(gw_tpl, pt, 5432):
            err("NetworkPolicies: the gateway's egress to the PostgreSQL pod is denied")
        for np in policies_for(pt, "Ingress"):
            for rule in np["spec"].get("ingress") or []:
                if not only_gateway(rule.get("from")):
                    err(f"NetworkPolicy/{np['metadata']['name']}: PostgreSQL open to more than the gateway: {rule.get('from')}")
    elif not egress_allows(gw_tpl, None, 5432):
        err("NetworkPolicies: the gateway's egress to the external PostgreSQL (5432) is denied")

    # --- The gateway: replicas, HPA, database URL.
    if gw_w["kind"] != "Deployment" or (gw_w["spec"].get("replicas") or 1) < 2:
        err(f"the gateway must be a Deployment with >= 2 replicas, got {name_of(gw_w)} x{gw_w['spec'].get('replicas')}")
    hpas = [h for h in by_kind.get("HorizontalPodAutoscaler", [])
            if h["spec"]["scaleTargetRef"].get("kind") == gw_w["kind"] and h["spec"]["scaleTargetRef"]["name"] == gw_w["metadata"]["name"]]
    if not hpas or (hpas[0]["spec"].get("minReplicas") or 1) < 2:
        err("the gateway needs a HorizontalPodAutoscaler with minReplicas >= 2")
    env = {e["name"]: e for e in gw_c.get("env") or []}
    db = env.get("SECURELLM_DATABASE_URL")
    if db is None:
        err("the gateway has no SECURELLM_DATABASE_URL (several replicas need one database)")
    elif "value" in db and "valueFrom" in db:
        err("gateway: SECURELLM_DATABASE_URL has both value and valueFrom")
    elif "value" in db and not str(db["value"]).startswith("postgres"):
        err(f"gateway: SECURELLM_DATABASE_URL is not a PostgreSQL URL: {db['value']}")
    elif "valueFrom" in db and "secretKeyRef" not in db["valueFrom"]:
        err("gateway: SECURELLM_DATABASE_URL must come from a Secret")
    if "SECURELLM_REPLICA_ID" not in env:
        err("gateway: no SECURELLM_REPLICA_ID (one audit chain per replica)")


def render(k8s_dir, target):
    r = subprocess.run([kubectl(), "kustomize", target], capture_output=True, text=True)
    if r.returncode != 0:
        return None, r.stderr.strip()
    # (Newer kustomize warns on stderr about the v2.0.3 field names the overlays use: expected.)
    return [o for o in yaml.safe_load_all(r.stdout) if o], None


def check_tree(k8s_dir):
    """{target: [errors]} for the base and every overlay of a deploy/k8s tree."""
    overlays_dir = os.path.join(k8s_dir, "overlays")
    targets = [(os.path.join(k8s_dir, "base"), None)] + [
        (os.path.join(overlays_dir, d),) * 2 for d in sorted(os.listdir(overlays_dir))
        if os.path.isfile(os.path.join(overlays_dir, d, "kustomization.yaml"))]
    results = {}
    for target, overlay in targets:
        errors = []
        objs, e = render(k8s_dir, target)
        if objs is None:
            errors.append(f"`kubectl kustomize` failed: {e}")
        else:
            try:
                check_render(objs, k8s_dir, overlay, errors.append)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                errors.append(f"the check itself broke on this render ({type(e).__name__}: {e}): fix the manifest or the check")
        results[os.path.relpath(target, k8s_dir)] = errors
    return results


# One fault each, in a copy of deploy/k8s: (file, text, replacement, words of the expected error).
MUTATIONS = [
    ("base/node-agent.yaml", '"--llama-server", "/usr/local/bin/llama-server"', '"--llama-srv", "/usr/local/bin/llama-server"', "flag --llama-srv"),
    ("base/gateway.yaml", '"--http-listen", "0.0.0.0:8088"', '"--http-listn", "0.0.0.0:8088"', "flag --http-listn"),
    ("base/node-agent.yaml", '"--listen", "0.0.0.0:50052"', '"--listen", "0.0.0.0:50062"', "containerPort"),
    ("base/gateway.yaml", "httpGet: {path: /ready, port: http}", "httpGet: {path: /readyz, port: http}", "path /readyz"),
    ("base/gateway.yaml", "livenessProbe:\n            httpGet: {path: /health", "livenessProbe:\n            httpGet: {path: /ready", "would restart every gateway"),
    ("base/services.yaml", "targetPort: backend-grpc", "targetPort: reg-grpc", "--backend"),
    ("base/gateway.yaml", '"--backend", "securellm-node:50053"', '"--backend", "securellm-node:50055"', "no port 50055"),
    ("base/node-agent.yaml", "      tolerations:\n        # GPU nodes are usually tainted so that only pods asking for GPUs land there.\n        - key: nvidia.com/gpu", "      tolerations:\n        - key: example.com/other", "toleration for nvidia.com/gpu"),
    ("base/node-agent.yaml", "requests: {cpu: \"1\", memory: 2Gi, nvidia.com/gpu: 1}\n            limits: {cpu: \"8\", memory: 32Gi, nvidia.com/gpu: 1}", "requests: {cpu: \"1\", memory: 2Gi}\n            limits: {cpu: \"8\", memory: 32Gi}", "nvidia.com/gpu"),
    ("base/node-agent.yaml", "shareProcessNamespace: true", "shareProcessNamespace: false", "shareProcessNamespace"),
    ("base/gateway.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "readOnlyRootFilesystem"),
    ("base/node-agent.yaml", "&hardened\n            runAsNonRoot: true\n            runAsUser: 10001", "&hardened\n            runAsNonRoot: true\n            runAsUser: 0", "must run as 10001"),
    ("base/securellm.toml", 'reserve = "512MiB"', 'reserve = "512MiB"\nlisten_token = "0123456789abcdef0123456789abcdef"', "holds"),
    ("base/securellm.toml", "[storage]", '[storage]\nurl = "postgres://securellm:hunter2@db/securellm"', "URL with credentials"),
    ("base/securellm.toml", 'reserve = "512MiB"', 'reserv = "512MiB"', "--check-config"),
    ("base/gateway.yaml", "secretName: securellm-admin-token", "secretName: securellm-admin-tokens", "securellm-admin-tokens"),
    ("base/networkpolicy.yaml", "        - podSelector:\n            matchLabels:\n              app.kubernetes.io/name: securellm-gateway\n      ports:\n        - {protocol: TCP, port: 50051}", "        - podSelector: {}\n      ports:\n        - {protocol: TCP, port: 50051}", "more than the gateway"),
    ("base/networkpolicy.yaml", "  name: default-deny\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]", "  name: default-deny\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]", "default-deny"),
    ("base/gateway.yaml", "  replicas: 2", "  replicas: 1", ">= 2 replicas"),
    ("base/node-agent.yaml", "      shareProcessNamespace: true", "      shareProcessNamespace: true\n      hostPid: false", "not valid for Kubernetes"),
    ("base/gateway.yaml", '"install", "-m", "0400"', '"install", "-m", "0440"', "install mode 0440"),
    ("overlays/dev/postgres.yaml", "        - podSelector:\n            matchLabels:\n              app.kubernetes.io/name: securellm-gateway", "        - namespaceSelector: {}", "PostgreSQL open"),
]


def mutation_check(k8s_dir):
    failures = []
    for path, old, new, words in MUTATIONS:
        if words == "not valid for Kubernetes" and kubernetes_validate is None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, "k8s")
            shutil.copytree(k8s_dir, copy)
            f = os.path.join(copy, path)
            text = open(f).read()
            if text.count(old) != 1:
                failures.append(f"mutation {path}: {old!r} found {text.count(old)} times (update MUTATIONS)")
                continue
            open(f, "w").write(text.replace(old, new))
            errors = [e for es in check_tree(copy).values() for e in es]
            if not any(words in e for e in errors):
                failures.append(f"mutation not caught: {path}: {old!r} -> {new!r} (expected an error with {words!r}; got {errors[:3]})")
    return failures


def main():
    if kubernetes_validate is None:
        print("WARNING: the PyPI package kubernetes-validate is not installed (`make kubectl`): the rendered "
              "objects are NOT validated against the Kubernetes schemas", file=sys.stderr)
    if kubectl() is None:
        print("WARNING: kubectl not found (Debian package kubernetes-client; `make kubectl`): "
              "deploy/k8s was NOT rendered or checked (tests/k8s_check.py SKIPPED)", file=sys.stderr)
        return 0
    k8s_dir = os.path.join(ROOT, "deploy", "k8s")
    results = check_tree(k8s_dir)
    failed = {t: es for t, es in results.items() if es}
    if failed:
        print("deploy/k8s check FAILED:")
        for t, es in failed.items():
            print(f"  {t}:\n    " + "\n    ".join(es))
        return 1
    failures = mutation_check(k8s_dir)
    if failures:
        print("deploy/k8s mutation check FAILED (the checks miss a fault):\n  " + "\n  ".join(failures))
        return 1
    schema = f"valid for Kubernetes {' and '.join(SCHEMA_VERSIONS)} (strict schemas), " if kubernetes_validate else ""
    print(f"deploy/k8s OK: {', '.join(results)} rendered with `kubectl kustomize`, {schema}consistent with the "
          f"binaries' flags, the gateway's routes and each other; {len(MUTATIONS)} injected faults each caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
