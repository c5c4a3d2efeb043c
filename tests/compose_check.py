"""Check docker-compose.yml, docker-compose.gpu.yml and the Dockerfiles against the binaries.

(The containers themselves run in tests/compose_e2e.py; this is the cheap static half.)

Asserts: the four services exist and run the right binary; every flag they pass is one the binary's
`--help` lists; each healthcheck runs `securellm health` on the port the service listens on;
services reach each other by service name on the ports those listen on; named volumes are declared;
only the gateway publishes a port (its HTTP port) and only it leaves the internal network, which is
`internal: true`; each file under /run/secrets/ a command names is a Compose secret of that service
with a host file; every service runs as uid 10001 with a read-only root filesystem, an init, a
restart policy and a stop grace period; the default file reserves no GPU (it runs anywhere) and the
GPU override reserves NVIDIA GPUs for the scheduler and the backend manager in the host PID
namespace; the four share one internal token file on a volume they all mount; both Dockerfiles
name their base images by build argument, run as uid 10001 and have a HEALTHCHECK.

Usage: python tests/compose_check.py [BIN_DIR]   (default: $CARGO_TARGET_DIR or target, /debug)
"""
import os
import re
import subprocess
import sys

import yaml


def expand(s):
    """${VAR:-default} -> default (the file's defaults, as a user without those variables gets)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", s)

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
bin_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target")), "debug")
doc = yaml.safe_load(open(os.path.join(root, "docker-compose.yml")))
gpu_doc = yaml.safe_load(open(os.path.join(root, "docker-compose.gpu.yml")))
services = doc["services"]
errors = []


def err(msg):
    errors.append(msg)


want = {"vram-scheduler", "registry", "backend-manager", "securellm-gateway"}
if set(services) != want:
    err(f"services {sorted(services)} != {sorted(want)}")

listen_port = {}
for name, svc in services.items():
    cmd = svc.get("command") or []
    if not cmd or cmd[0] != name:
        err(f"{name}: command must start with the `{name}` binary: {cmd}")
        continue
    help_text = subprocess.run([os.path.join(bin_dir, name), "--help"], capture_output=True, text=True, check=True).stdout
    for flag in [a for a in cmd[1:] if a.startswith("--")]:
        if not re.search(rf"(^|\s){re.escape(flag)}[\s=<]", help_text):
            err(f"{name}: flag {flag} is not in `{name} --help`")
    args = dict(zip(cmd[1::2], cmd[2::2]))
    listen = args.get("--listen", "")
    if not listen.startswith("0.0.0.0:"):
        err(f"{name}: --listen must bind 0.0.0.0 in a container, got {listen!r}")
    listen_port[name] = listen.rsplit(":", 1)[-1]
    test = svc.get("healthcheck", {}).get("test", [])
    if test[:3] != ["CMD", "securellm", "health"] or not test[3].endswith(":" + listen_port[name]):
        err(f"{name}: healthcheck must be `securellm health 127.0.0.1:{listen_port[name]}`, got {test}")
    for v in svc.get("volumes", []):
        vol = expand(v).split(":")[0]
        if not vol.startswith((".", "/")) and vol not in (doc.get("volumes") or {}):
            err(f"{name}: volume {vol} is not declared")
    # Hardening.
    if svc.get("user") != "10001:10001":
        err(f"{name}: must run as 10001:10001, got {svc.get('user')!r}")
    for key, want in (("read_only", True), ("init", True), ("restart", "unless-stopped")):
        if svc.get(key) != want:
            err(f"{name}: {key} must be {want!r}, got {svc.get(key)!r}")
    if not svc.get("stop_grace_period"):
        err(f"{name}: no stop_grace_period")
    if "ALL" not in (svc.get("cap_drop") or []):
        err(f"{name}: cap_drop must include ALL")
    # Secrets: every /run/secrets/NAME the command names is a secret of this service, with a file.
    for a in cmd:
        if a.startswith("/run/secrets/"):
            sec = a[len("/run/secrets/"):]
            if sec not in (svc.get("secrets") or []):
                err(f"{name}: {a} but the service does not list secret {sec}")
            elif not ((doc.get("secrets") or {}).get(sec) or {}).get("file"):
                err(f"{name}: secret {sec} has no file")
            elif not os.path.isfile(os.path.join(root, expand((doc["secrets"][sec])["file"]))):
                err(f"{name}: secret {sec}'s default file does not exist")

# Cross-references: host:port arguments must name a service and the port it listens on.
for name, svc in services.items():
    cmd = svc.get("command") or []
    args = dict(zip(cmd[1::2], cmd[2::2]))
    for flag in ("--scheduler", "--registry", "--backend"):
        if flag in args:
            host, port = args[flag].rsplit(":", 1)
            if host not in services:
                err(f"{name}: {flag} {args[flag]} names no service")
            elif listen_port.get(host) != port:
                err(f"{name}: {flag} port {port} but {host} listens on {listen_port.get(host)}")
    for dep in svc.get("depends_on", {}):
        if dep not in services:
            err(f"{name}: depends_on {dep} is not a service")

gw = services.get("securellm-gateway", {})
gw_args = dict(zip(gw.get("command", [])[1::2], gw.get("command", [])[2::2]))
http_port = gw_args.get("--http-listen", ":").rsplit(":", 1)[-1]
gw_ports = [expand(p) for p in gw.get("ports", [])]
if len(gw_ports) != 1 or not gw_ports[0].endswith(f":{http_port}"):
    err(f"gateway: exactly its HTTP port {http_port} must be published: {gw.get('ports')}")
elif not gw_ports[0].startswith("127.0.0.1:"):
    err(f"gateway: publish on loopback by default, got {gw_ports[0]}")

# Networks: all on `internal` (internal: true); only the gateway on another one; only it publishes.
networks = doc.get("networks") or {}
if not (networks.get("internal") or {}).get("internal"):
    err("networks.internal must be `internal: true`")
for name, svc in services.items():
    nets = svc.get("networks") or []
    if "internal" not in nets:
        err(f"{name}: not on the internal network: {nets}")
    for n in nets:
        if n not in networks:
            err(f"{name}: network {n} is not declared")
    if name != "securellm-gateway":
        if set(nets) != {"internal"}:
            err(f"{name}: must be on the internal network only, got {nets}")
        if svc.get("ports") or svc.get("expose"):
            err(f"{name}: must publish nothing, got {svc.get('ports')}")

# The default file runs anywhere: no GPU reservation, no host PID namespace.
for name, svc in services.items():
    if svc.get("deploy") or svc.get("pid"):
        err(f"{name}: docker-compose.yml must not reserve GPUs or share the host PID namespace (docker-compose.gpu.yml does)")

# The GPU override: NVIDIA reservations and the host PID namespace for the scheduler and the manager.
for name in gpu_doc.get("services") or {}:
    if name not in services:
        err(f"docker-compose.gpu.yml: {name} is not a service of docker-compose.yml")
for name in ("vram-scheduler", "backend-manager"):
    svc = (gpu_doc.get("services") or {}).get(name) or {}
    devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices):
        err(f"docker-compose.gpu.yml: {name}: no NVIDIA GPU reservation")
    if svc.get("pid") != "host":
        err(f"docker-compose.gpu.yml: {name}: pid must be host (NVML's per-process accounting)")

# Both Dockerfiles: base images by build argument, uid 10001, a HEALTHCHECK.
for path in ("Dockerfile", "docker/prebuilt.Dockerfile"):
    text = open(os.path.join(root, path)).read()
    froms = [l.split()[1] for l in text.splitlines() if l.startswith("FROM ")]
    if not froms or not all(f.startswith("${") for f in froms):
        err(f"{path}: every FROM must name its image by build argument: {froms}")
    if "USER 10001" not in text:
        err(f"{path}: no USER 10001")
    if "\nHEALTHCHECK " not in text:
        err(f"{path}: no HEALTHCHECK")

# One internal token for all four, on a volume each of them mounts.
token_files = {}
for name, svc in services.items():
    cmd = svc.get("command") or []
    args = dict(zip(cmd[1::2], cmd[2::2]))
    token_files[name] = args.get("--internal-token-file")
    mounts = [expand(v).split(":")[1] for v in svc.get("volumes", []) if ":" in v]
    if token_files[name] and not any(token_files[name].startswith(m.rstrip("/") + "/") for m in mounts):
        err(f"{name}: --internal-token-file {token_files[name]} is on no volume it mounts")
if len(set(token_files.values())) != 1 or None in token_files.values():
    err(f"the services must share one --internal-token-file: {token_files}")

# Two gateways on one PostgreSQL (docker-compose.gateways.yml), merged by Compose itself.
def compose_cmd():
    import shutil
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None

two_gateways = "SKIPPED (no docker compose / docker-compose)"
cc = compose_cmd()
if cc is None:
    print("WARNING: docker-compose.gateways.yml not checked: no Compose here", file=sys.stderr)
else:
    env = dict(os.environ, SECURELLM_DB_PASSWORD="check-only")
    out = subprocess.run(cc + ["-f", "docker-compose.yml", "-f", "docker-compose.gateways.yml", "config"],
                         cwd=root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        err(f"docker-compose.gateways.yml does not merge: {out.stderr.strip()}")
    else:
        merged = yaml.safe_load(out.stdout)["services"]
        gws = [merged.get(n) for n in ("securellm-gateway", "securellm-gateway-2")]
        if None in gws or "postgres" not in merged:
            err("docker-compose.gateways.yml: needs securellm-gateway, securellm-gateway-2 and postgres")
        else:
            help_text = subprocess.run([os.path.join(bin_dir, "securellm-gateway"), "--help"],
                                       capture_output=True, text=True, check=True).stdout
            for flag in [a for a in gws[1]["command"][1:] if a.startswith("--")]:
                if not re.search(rf"(^|\s){re.escape(flag)}[\s=<]", help_text):
                    err(f"securellm-gateway-2: flag {flag} is not in `securellm-gateway --help`")
            env_of = [g.get("environment") or {} for g in gws]
            urls = {e.get("SECURELLM_DATABASE_URL") for e in env_of}
            if len(urls) != 1 or not next(iter(urls), "").startswith("postgres://") or "@postgres/" not in next(iter(urls)):
                err(f"the two gateways must share one database URL on the postgres service: {urls}")
            ids = [e.get("SECURELLM_REPLICA_ID") for e in env_of]
            if None in ids or len(set(ids)) != 2:
                err(f"the two gateways need distinct SECURELLM_REPLICA_ID (their audit chains): {ids}")
            dirs = [dict(zip(g["command"][1::2], g["command"][2::2])).get("--data-dir") for g in gws]
            if len(set(dirs)) != 2:
                err(f"the two gateways need distinct --data-dir: {dirs}")
            ports = [str(p) for g in gws for p in g.get("ports", [])]
            if len(ports) != 2 or len({p.split(":")[-2] for p in ports}) != 2:
                err(f"each gateway publishes one HTTP port, different ones: {ports}")
            pg = merged["postgres"]
            if pg.get("ports"):
                err("postgres must not publish a port")
            if set(pg.get("networks", {})) != {"internal"}:
                err(f"postgres must be on the internal network only: {pg.get('networks')}")
            for n, g in zip(("securellm-gateway", "securellm-gateway-2"), gws):
                if "postgres" not in (g.get("depends_on") or {}):
                    err(f"{n} must depend on postgres")
            two_gateways = "OK"

if errors:
    print("docker-compose.yml check FAILED:\n  " + "\n  ".join(errors))
    sys.exit(1)
print(f"docker-compose.yml OK: {len(services)} services consistent with the binaries' flags; "
      f"docker-compose.gpu.yml and both Dockerfiles OK; docker-compose.gateways.yml {two_gateways}")
