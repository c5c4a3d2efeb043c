"""Check docker-compose.yml against the binaries (no Docker engine runs on the dev machine).

Asserts: the four services exist and run the right binary; every flag they pass is one the binary's
`--help` lists; each healthcheck runs `securellm health` on the port the service listens on;
services reach each other by service name on the ports those listen on; named volumes are declared;
the gateway publishes its HTTP port; GPU reservations use the NVIDIA driver; the four share one
internal token file on a volume they all mount.

Usage: python tests/compose_check.py [BIN_DIR]   (default: $CARGO_TARGET_DIR or target, /debug)
"""
import os
import re
import subprocess
import sys

import yaml

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
bin_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target")), "debug")
doc = yaml.safe_load(open(os.path.join(root, "docker-compose.yml")))
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
        vol = v.split(":")[0]
        if not vol.startswith((".", "/")) and vol not in (doc.get("volumes") or {}):
            err(f"{name}: volume {vol} is not declared")

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
if f"{http_port}:{http_port}" not in gw.get("ports", []):
    err(f"gateway: HTTP port {http_port} is not published: {gw.get('ports')}")

for name in ("vram-scheduler", "backend-manager"):
    devices = services.get(name, {}).get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices):
        err(f"{name}: no NVIDIA GPU reservation")

# One internal token for all four, on a volume each of them mounts.
token_files = {}
for name, svc in services.items():
    cmd = svc.get("command") or []
    args = dict(zip(cmd[1::2], cmd[2::2]))
    token_files[name] = args.get("--internal-token-file")
    mounts = [v.split(":")[1] for v in svc.get("volumes", []) if ":" in v]
    if token_files[name] and not any(token_files[name].startswith(m.rstrip("/") + "/") for m in mounts):
        err(f"{name}: --internal-token-file {token_files[name]} is on no volume it mounts")
if len(set(token_files.values())) != 1 or None in token_files.values():
    err(f"the services must share one --internal-token-file: {token_files}")

if errors:
    print("docker-compose.yml check FAILED:\n  " + "\n  ".join(errors))
    sys.exit(1)
print(f"docker-compose.yml OK: {len(services)} services consistent with the binaries' flags")
