#!/usr/bin/env bash
# `make test` (and `make check-deploy`): static checks of what runs the relay outside this
# repository's tests, where no Docker engine, systemd or Kubernetes cluster is at hand:
#   - deploy/kubernetes/*.yaml against the Kubernetes JSON schemas (kubernetes-validate, strict;
#     its schemas are bundled: no network), and the ServiceMonitor (a CRD, no bundled schema) and
#     the wiring between the objects structurally (selectors, ports, probes, secret paths);
#   - packaging/pg-outbox-relay.service with systemd-analyze verify, when systemd-analyze exists;
#   - docker/Dockerfile.relay and docker/compose.yml: a non-root user, the HEALTHCHECK through
#     `pg-outbox-relay healthcheck`, and compose waiting on the relay's health.
# Nothing here builds an image or starts a container: that needs a Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "check-deploy: $*"; }

say "kubernetes-validate --strict deploy/kubernetes"
manifests=(deploy/kubernetes/{namespace,serviceaccount,configmap,deployment,poddisruptionbudget,service,secret.example}.yaml)
kubernetes-validate --strict --quiet "${manifests[@]}"

say "deploy/kubernetes: the ServiceMonitor and the wiring between the objects"
python3 - <<'PY'
import sys, yaml
d = "deploy/kubernetes/"
def load(name):
    with open(d + name) as f:
        return yaml.safe_load(f)
problems = []
def need(ok, what):
    if not ok:
        problems.append(what)
kust = load("kustomization.yaml")
for r in kust["resources"]:
    load(r)
dep, svc, pdb, sm, cm = (load(n) for n in
    ["deployment.yaml", "service.yaml", "poddisruptionbudget.yaml", "servicemonitor.yaml", "configmap.yaml"])
labels = dep["spec"]["template"]["metadata"]["labels"]
def selects(selector):
    return all(labels.get(k) == v for k, v in selector.items())
need(dep["spec"]["replicas"] == 2, "the Deployment runs 2 replicas (one streams, one stands by)")
need(selects(dep["spec"]["selector"]["matchLabels"]), "the Deployment's selector matches its pods")
need(selects(pdb["spec"]["selector"]["matchLabels"]), "the PodDisruptionBudget selects the relays")
need(pdb["spec"].get("minAvailable") == 1, "the PodDisruptionBudget keeps one relay")
need(selects(svc["spec"]["selector"]), "the Service selects the relays")
# ServiceMonitor (monitoring.coreos.com/v1): no schema is bundled; its required shape
need(sm.get("apiVersion") == "monitoring.coreos.com/v1" and sm.get("kind") == "ServiceMonitor",
     "ServiceMonitor apiVersion/kind")
need(bool(sm.get("metadata", {}).get("name")), "ServiceMonitor metadata.name")
spec = sm.get("spec", {})
need(isinstance(spec.get("endpoints"), list) and spec["endpoints"], "ServiceMonitor spec.endpoints")
svc_labels = svc["metadata"].get("labels", {})
need(all(svc_labels.get(k) == v for k, v in spec.get("selector", {}).get("matchLabels", {}).items())
     and spec.get("selector", {}).get("matchLabels"), "the ServiceMonitor selects the Service")
ports = {p["name"] for p in svc["spec"]["ports"]}
for e in spec.get("endpoints", []):
    need(e.get("port") in ports, f"ServiceMonitor endpoint port {e.get('port')} is a Service port")
    need(set(e) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings",
                    "metricRelabelings", "honorLabels"}, f"ServiceMonitor endpoint keys {sorted(e)}")
need(sm["metadata"].get("namespace") in spec.get("namespaceSelector", {}).get("matchNames", []),
     "the ServiceMonitor looks in its namespace")
c = dep["spec"]["template"]["spec"]["containers"][0]
need(c["readinessProbe"]["httpGet"]["path"] == "/healthz", "readiness is /healthz")
live = c["livenessProbe"]["exec"]["command"]
need(live[:3] == ["pg-outbox-relay", "healthcheck", "--live"], "liveness is healthcheck --live")
need(c["securityContext"]["allowPrivilegeEscalation"] is False
     and c["securityContext"]["readOnlyRootFilesystem"] is True, "container hardening")
need(dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True, "runs as non-root")
# every file the settings name is mounted
mounts = [m["mountPath"] for m in c["volumeMounts"]]
toml = cm["data"]["relay.toml"]
for line in toml.splitlines():
    if line.startswith(("pg_password_file", "pg_sslrootcert")):
        path = line.split("=", 1)[1].strip().strip('"')
        need(any(path.startswith(m + "/") for m in mounts), f"{path} is mounted")
need("pg_password =" not in toml, "no password in the ConfigMap")
for e in c.get("env", []):
    if e["name"].endswith("_FILE"):
        need(any(e["value"].startswith(m + "/") for m in mounts), f"{e['value']} is mounted")
if problems:
    for p in problems:
        print("check-deploy: FAIL", p)
    sys.exit(1)
print("check-deploy: ok: ServiceMonitor (structure), selectors, ports, probes, mounted secrets")
PY

if command -v systemd-analyze >/dev/null; then
    say "systemd-analyze verify packaging/pg-outbox-relay.service"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # ExecStart must exist for verify: the unit as installed, with this build's binary
    sed "s|/usr/local/bin/pg-outbox-relay|${PG_OUTBOX_RELAY_BIN:-$PWD/target/debug/pg-outbox-relay}|" \
        packaging/pg-outbox-relay.service >"$tmp/pg-outbox-relay.service"
    systemd-analyze verify "$tmp/pg-outbox-relay.service"
else
    say "systemd-analyze not installed: the unit is checked by grep only"
fi
unit=packaging/pg-outbox-relay.service
for line in '^Type=notify$' '^RestartPreventExitStatus=2 3$' '^LoadCredential=pg_password:' \
    '^Environment=PG_OUTBOX_PG_PASSWORD_FILE=%d/pg_password$' '^NoNewPrivileges=yes$' \
    '^ProtectSystem=strict$' '^DynamicUser=yes$'; do
    grep -q "$line" "$unit" || { say "FAIL $unit lacks $line"; exit 1; }
done

say "docker/Dockerfile.relay and docker/compose.yml (static: no Docker engine here)"
df=docker/Dockerfile.relay
grep -q '^USER 10001:10001$' "$df" || { say "FAIL $df does not run as uid 10001"; exit 1; }
# (a HEALTHCHECK may continue over lines)
sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$df" | grep -q '^HEALTHCHECK .*CMD \["pg-outbox-relay", "healthcheck"' \
    || { say "FAIL $df has no HEALTHCHECK through pg-outbox-relay healthcheck"; exit 1; }
python3 - <<'PY'
import sys, yaml
c = yaml.safe_load(open("docker/compose.yml"))
relay = c["services"]["relay"]
test = relay.get("healthcheck", {}).get("test", [])
ok = test[:3] == ["CMD", "pg-outbox-relay", "healthcheck"]
ok = ok and c["services"]["postgres"]["healthcheck"]
waits = [s for s, v in c["services"].items()
         if v.get("depends_on", {}).get("relay", {}).get("condition") == "service_healthy"]
if not ok:
    print("check-deploy: FAIL compose: the relay's healthcheck is not pg-outbox-relay healthcheck"); sys.exit(1)
print("check-deploy: ok: compose healthchecks" + (f" ({', '.join(waits)} wait for the relay)" if waits else ""))
PY
say "ok"
