"""The Helm chart (helm/shard), rendered offline as a cluster would receive it: `helm lint
--strict`, every manifest against the Kubernetes API schemas (kubernetes-validate, strict),
and the rendered objects themselves: probes, labels, resources, one StatefulSet per region,
the certificates' SANs and the SHARD_* settings each node reads.

Run with `make helm-test` (it fetches Helm); HELM names the binary, else `helm` on PATH."""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.helm

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "shard"
EXAMPLES = CHART / "examples"
VALUES = {
    "default": [],
    "single-region": [EXAMPLES / "single-region.yaml"],
    "three-regions": [EXAMPLES / "three-regions.yaml"],
}
# The chart's floor (gRPC probes are GA from 1.27) and a recent release.
KUBE_VERSIONS = ("1.27", "1.33")
RELEASE, NAMESPACE = "demo", "inference"
FULLNAME = "demo-shard"
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
STANDARD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                   "app.kubernetes.io/managed-by", "helm.sh/chart")
HEALTH_PORT = yaml.safe_load((CHART / "values.yaml").read_text())["ports"]["health"]

# cert-manager's Certificate is a custom resource, outside the Kubernetes schemas: the
# fields of cert-manager.io/v1 the chart uses, strictly (a misspelt field fails).
CERTIFICATE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["secretName", "issuerRef"],
            "additionalProperties": False,
            "properties": {
                "secretName": {"type": "string"},
                "secretTemplate": {"type": "object", "additionalProperties": False,
                                   "properties": {"labels": {"type": "object"}, "annotations": {"type": "object"}}},
                "commonName": {"type": "string", "maxLength": 64},
                "duration": {"type": "string", "pattern": r"^([0-9.]+(ns|us|ms|s|m|h))+$"},
                "renewBefore": {"type": "string", "pattern": r"^([0-9.]+(ns|us|ms|s|m|h))+$"},
                "privateKey": {"type": "object", "additionalProperties": False, "properties": {
                    "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                    "size": {"type": "integer"},
                    "encoding": {"enum": ["PKCS1", "PKCS8"]},
                    "rotationPolicy": {"enum": ["Never", "Always"]}}},
                "usages": {"type": "array", "items": {"enum": [
                    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
                    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
                    "server auth", "client auth", "code signing", "email protection", "s/mime",
                    "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
                    "microsoft sgc", "netscape sgc"]}},
                "uris": {"type": "array", "items": {"type": "string"}},
                "dnsNames": {"type": "array", "items": {"type": "string"}},
                "issuerRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                              "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                             "group": {"type": "string"}}},
            },
        },
    },
}


@pytest.fixture(scope="session")
def helm(tmp_path_factory):
    binary = os.environ.get("HELM") or shutil.which("helm")
    assert binary, "no helm binary: run `make helm-test` (it fetches one) or set HELM"
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, **{f"HELM_{kind}_HOME": str(home / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")}}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([binary, *args], env=env, capture_output=True, text=True, timeout=120)

    return run


def render(helm, files=(), sets=()) -> subprocess.CompletedProcess:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for path in files:
        args += ["--values", str(path)]
    for assignment in sets:
        args += ["--set", assignment]
    return helm(*args)


def objects(helm, files=(), sets=()) -> list[dict]:
    result = render(helm, files, sets)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session")
def rendered(helm) -> dict[str, list[dict]]:
    return {name: objects(helm, files) for name, files in VALUES.items()}


def of_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def three_regions() -> dict:
    return yaml.safe_load((EXAMPLES / "three-regions.yaml").read_text())


@pytest.mark.parametrize("name", VALUES)
def test_lint_strict(helm, name):
    args = ["lint", "--strict", str(CHART)]
    for path in VALUES[name]:
        args += ["--values", str(path)]
    result = helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("name", VALUES)
def test_every_manifest_is_valid(rendered, name):
    # Imported here, not at the top: collecting this file must not need the validator.
    import jsonschema
    import kubernetes_validate

    assert rendered[name]
    for doc in rendered[name]:
        if doc["apiVersion"].startswith("cert-manager.io/"):
            jsonschema.validate(doc, CERTIFICATE_SCHEMA)
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_validation_rejects_a_misspelt_field(rendered):
    """The check above is strict: an unknown field in a probe fails it."""
    import kubernetes_validate

    stage = copy.deepcopy(next(iter(of_kind(rendered["default"], "StatefulSet").values())))
    stage["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(stage, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize("name", VALUES)
def test_standard_labels_and_selectors(rendered, name):
    for doc in rendered[name]:
        labels = doc["metadata"]["labels"]
        for key in STANDARD_LABELS:
            assert labels.get(key), f"{doc['kind']}/{doc['metadata']['name']} lacks {key}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == APP_VERSION
    for workload in workloads(rendered[name]):
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items()
        assert pod_labels["app.kubernetes.io/component"] in ("registry", "coordinator", "stage")
    # Each Service reaches the pods of its own component only.
    components = {w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                  for w in workloads(rendered[name])}
    for service in of_kind(rendered[name], "Service").values():
        selector = service["spec"]["selector"]
        if "statefulset.kubernetes.io/pod-name" not in selector:
            assert selector["app.kubernetes.io/component"] in components


@pytest.mark.parametrize("name", VALUES)
def test_pinned_image(rendered, name):
    for workload in workloads(rendered[name]):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            repository, tag = container["image"].rsplit(":", 1)
            assert tag != "latest" and tag.startswith(APP_VERSION), container["image"]


def test_latest_is_refused(helm):
    result = render(helm, sets=["image.tag=latest"])
    assert result.returncode != 0 and "image.tag" in result.stderr


@pytest.mark.parametrize("name", VALUES)
def test_grpc_probes_on_the_health_listener(rendered, name):
    for workload in workloads(rendered[name]):
        container = workload["spec"]["template"]["spec"]["containers"][0]
        env = env_of(container)
        assert env["SHARD_HEALTH_LISTEN"].endswith(f":{HEALTH_PORT}")
        assert {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"} in container["ports"]
        assert container["readinessProbe"]["grpc"] == {"port": HEALTH_PORT, "service": ""}
        assert container["livenessProbe"]["grpc"] == {"port": HEALTH_PORT, "service": "liveness"}
        assert container["startupProbe"]["grpc"] == {"port": HEALTH_PORT, "service": "liveness"}
        startup = container["startupProbe"]
        if workload["kind"] == "StatefulSet":
            # Weight loading: a stage has half an hour before liveness applies.
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800


def test_one_statefulset_per_region(rendered):
    values = three_regions()
    stages = of_kind(rendered["three-regions"], "StatefulSet")
    assert set(stages) == {f"{FULLNAME}-stage-{r['name']}" for r in values["regions"]}
    for region in values["regions"]:
        sts = stages[f"{FULLNAME}-stage-{region['name']}"]
        pod = sts["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = env_of(container)
        assert sts["spec"]["replicas"] == region["replicas"]
        assert pod["nodeSelector"] == region["nodeSelector"]
        assert pod["tolerations"] == region.get("tolerations", values["stages"]["tolerations"])
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        # A region's own limits win over the stage defaults, which fill in the rest.
        limits = {**values["stages"]["resources"]["limits"], **region.get("resources", {}).get("limits", {})}
        assert container["resources"]["limits"] == limits
        assert container["resources"]["requests"] == values["stages"]["resources"]["requests"]
        assert env["SHARD_REGION"] == region["name"]
        assert env["SHARD_MEMORY_BUDGET"] == region["memoryBudget"]
        assert env.get("SHARD_TRUST") == region.get("trust")
        assert env["SHARD_DTYPE"] == "bfloat16"
        assert sts["spec"]["template"]["metadata"]["labels"]["shard/region"] == region["name"]
    budgets = of_kind(rendered["three-regions"], "PodDisruptionBudget")
    assert set(budgets) == set(stages)
    for name, budget in budgets.items():
        assert budget["spec"]["selector"]["matchLabels"] == stages[name]["spec"]["selector"]["matchLabels"]
        assert budget["spec"]["maxUnavailable"] == 1
    registry_env = env_of(of_kind(rendered["three-regions"], "Deployment")[f"{FULLNAME}-registry"]
                          ["spec"]["template"]["spec"]["containers"][0])
    assert registry_env["SHARD_STAGES"] == str(sum(r["replicas"] for r in values["regions"]))


def test_each_stage_pod_has_its_own_dialable_address(rendered):
    values = three_regions()
    services = of_kind(rendered["three-regions"], "Service")
    for region in values["regions"]:
        sts = of_kind(rendered["three-regions"], "StatefulSet")[f"{FULLNAME}-stage-{region['name']}"]
        env = env_of(sts["spec"]["template"]["spec"]["containers"][0])
        assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["SHARD_NODE_ID"] == "$(POD_NAME)"
        domain = region["service"]["domain"]
        assert env["SHARD_ADVERTISE"] == f"$(POD_NAME).{domain}:50051"
        for i in range(region["replicas"]):
            pod = f"{sts['metadata']['name']}-{i}"
            service = services[pod]
            assert service["spec"]["selector"] == {"statefulset.kubernetes.io/pod-name": pod}
            assert service["spec"]["type"] == "LoadBalancer"
            assert service["spec"]["publishNotReadyAddresses"] is True
            assert service["metadata"]["annotations"]["external-dns.alpha.kubernetes.io/hostname"] == f"{pod}.{domain}"
            assert service["spec"]["ports"][0]["targetPort"] == "grpc"
    # In one cluster, a stage advertises its Service's in-cluster name.
    sts = of_kind(rendered["default"], "StatefulSet")[f"{FULLNAME}-stage-default"]
    env = env_of(sts["spec"]["template"]["spec"]["containers"][0])
    assert env["SHARD_ADVERTISE"] == f"$(POD_NAME).{NAMESPACE}.svc.cluster.local:50051"
    assert of_kind(rendered["default"], "Service")[f"{FULLNAME}-stage-default-0"]["spec"]["type"] == "ClusterIP"


def service_names(name: str) -> list[str]:
    return [name, f"{name}.{NAMESPACE}", f"{name}.{NAMESPACE}.svc", f"{name}.{NAMESPACE}.svc.cluster.local"]


def test_certificates_name_each_node(rendered):
    values = three_regions()
    certificates = of_kind(rendered["three-regions"], "Certificate")
    expected = {f"{FULLNAME}-registry": ("registry", "registry", ["registry.shard.example.com"]),
                f"{FULLNAME}-coordinator": ("coordinator", "coordinator", ["coordinator.shard.example.com"]),
                f"{FULLNAME}-client-client": ("client", "client", None)}
    for region in values["regions"]:
        for i in range(region["replicas"]):
            pod = f"{FULLNAME}-stage-{region['name']}-{i}"
            expected[pod] = ("stage", pod, [f"{pod}.{region['service']['domain']}"])
    assert set(certificates) == set(expected)
    for name, (role, node_id, public) in expected.items():
        spec = certificates[name]["spec"]
        assert spec["uris"] == [f"shard://{role}/{node_id}"]
        # The identity's DNS SAN (shard.wire.certs.Identity.dns_name) first, then where it is reached.
        names = [f"{node_id}.{role}.shard.internal"]
        if public is not None:
            names += service_names(name) + public
        assert spec["dnsNames"] == names
        assert spec["issuerRef"] == {"name": "shard-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
        assert {"server auth", "client auth"} <= set(spec["usages"])
        assert spec["secretName"] == f"{name}-tls"


def test_each_node_mounts_its_own_certificate(rendered):
    docs = rendered["three-regions"]
    for name, workload in of_kind(docs, "Deployment").items():
        env = env_of(workload["spec"]["template"]["spec"]["containers"][0])
        volume = next(v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "certs")
        assert volume["secret"]["secretName"] == f"{name}-tls"
        assert {i["path"] for i in volume["secret"]["items"]} == {
            "ca.pem", f"{env['SHARD_NODE_ID']}.pem", f"{env['SHARD_NODE_ID']}.key"}
    for name, sts in of_kind(docs, "StatefulSet").items():
        volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "certs")
        sources = volume["projected"]["sources"]
        assert len(sources) == sts["spec"]["replicas"]
        for i, source in enumerate(sources):
            pod = f"{name}-{i}"
            assert source["secret"]["name"] == f"{pod}-tls"
            paths = {item["key"]: item["path"] for item in source["secret"]["items"]}
            assert paths["tls.crt"] == f"{pod}.pem" and paths["tls.key"] == f"{pod}.key"
        assert sources[0]["secret"]["items"][0] == {"key": "ca.crt", "path": "ca.pem"}


def test_existing_secret_instead_of_cert_manager(helm):
    docs = objects(helm, sets=["certificates.source=existingSecret", "certificates.existingSecret=shard-certs"])
    assert not of_kind(docs, "Certificate")
    for workload in workloads(docs):
        volume = next(v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "certs")
        assert volume["secret"]["secretName"] == "shard-certs"
    result = render(helm, sets=["certificates.source=existingSecret"])
    assert result.returncode != 0 and "certificates.existingSecret is required" in result.stderr


def _flags(command: str) -> set[str]:
    """The SHARD_* variables `shard <command>` reads: one per flag, SHARD_ + the flag's name."""
    from shard.cli import parser

    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = [o for a in commands.choices[command]._actions for o in a.option_strings if o.startswith("--")]
    return {"SHARD_" + o[2:].upper().replace("-", "_") for o in options if o != "--help"}


@pytest.mark.parametrize("name", VALUES)
def test_env_names_flags_the_command_has(rendered, name):
    """Every SHARD_* variable the chart sets is one the node's command reads; and the
    paths it names are where the chart mounts them."""
    for workload in workloads(rendered[name]):
        container = workload["spec"]["template"]["spec"]["containers"][0]
        command = container["args"][0]
        env = env_of(container)
        unknown = {v for v in env if v.startswith("SHARD_")} - _flags(command)
        assert not unknown, f"{command} has no flag for {unknown}"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert env["SHARD_CERTS"] == mounts["certs"]
        assert env["SHARD_MODEL"].startswith(mounts["model"])
        assert env["SHARD_LISTEN"] == "0.0.0.0:50051"
        if command == "registry":
            assert "SHARD_SECRET" not in env and "deployment-secret" not in mounts
        else:
            assert env["SHARD_SECRET"] == mounts["deployment-secret"] + "/deployment.secret"
            assert env["SHARD_REGISTRY"]


def test_a_kv_reservation_reaches_the_registry(helm):
    def registry_env(sets):
        registry = next(w for w in workloads(objects(helm, sets=sets))
                        if w["spec"]["template"]["spec"]["containers"][0]["args"] == ["registry"])
        return env_of(registry["spec"]["template"]["spec"]["containers"][0])

    assert "SHARD_KV_RESERVE_POSITIONS" not in registry_env([])
    assert registry_env(["registry.kvReservePositions=2048"])["SHARD_KV_RESERVE_POSITIONS"] == "2048"
    assert "SHARD_KV_RESERVE_POSITIONS" in _flags("registry")
    result = render(helm, sets=["registry.kvReservePositions=-1"])
    assert result.returncode != 0 and "kvReservePositions" in result.stderr


def test_joining_nodes_dial_the_registry(rendered):
    default = rendered["default"]
    address = f"{FULLNAME}-registry.{NAMESPACE}.svc.cluster.local:50051"
    for workload in workloads(default):
        env = env_of(workload["spec"]["template"]["spec"]["containers"][0])
        if workload["spec"]["template"]["spec"]["containers"][0]["args"] != ["registry"]:
            assert env["SHARD_REGISTRY"] == address
    for workload in workloads(rendered["three-regions"]):
        env = env_of(workload["spec"]["template"]["spec"]["containers"][0])
        assert env.get("SHARD_REGISTRY", "registry.shard.example.com:50051") == "registry.shard.example.com:50051"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"


def test_scrape_annotations_from_values(rendered):
    for workload in workloads(rendered["three-regions"]):
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "9464",
                               "prometheus.io/path": "/metrics"}
        assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in \
            workload["spec"]["template"]["spec"]["containers"][0]["ports"]
        assert env_of(workload["spec"]["template"]["spec"]["containers"][0])["SHARD_METRICS_LISTEN"] == "0.0.0.0:9464"
    for workload in workloads(rendered["default"]):
        assert "annotations" not in workload["spec"]["template"]["metadata"]


def test_openai_http_api_on_the_coordinator(helm):
    """Off by default; enabled, the coordinator listens on ports.http with the API keys
    mounted from their Secret, and its Service publishes the port."""
    docs = objects(helm, sets=["coordinator.http.enabled=true", "coordinator.http.apiKeySecret=shard-api-keys",
                               "coordinator.http.tls=true", "coordinator.http.servedModelName=story"])
    import kubernetes_validate

    for doc in docs:
        if not doc["apiVersion"].startswith("cert-manager.io/"):
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
    coordinator = of_kind(docs, "Deployment")[f"{FULLNAME}-coordinator"]
    pod = coordinator["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = env_of(container)
    assert env["SHARD_HTTP_LISTEN"] == "0.0.0.0:8000" and env["SHARD_HTTP_TLS"] == "true"
    assert env["SHARD_SERVED_MODEL_NAME"] == "story"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["SHARD_API_KEY_FILE"] == mounts["api-keys"] + "/api-keys"
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == "shard-api-keys"
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
    service = of_kind(docs, "Service")[f"{FULLNAME}-coordinator"]
    assert {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP", "appProtocol": "https"} in \
        service["spec"]["ports"]
    unknown = {v for v in env if v.startswith("SHARD_")} - _flags("coordinator")
    assert not unknown
    for workload in workloads(objects(helm)):
        assert "SHARD_HTTP_LISTEN" not in env_of(workload["spec"]["template"]["spec"]["containers"][0])


def test_model_from_an_init_container(rendered):
    for workload in workloads(rendered["three-regions"]):
        pod = workload["spec"]["template"]["spec"]
        init = pod["initContainers"][0]
        assert init["image"] == "registry.example.com/model-fetcher:2.3.1"
        assert {"name": "MODEL_DIR", "value": "/model"} in init["env"]
        model = next(v for v in pod["volumes"] if v["name"] == "model")
        assert model["emptyDir"] == {"sizeLimit": "200Gi"}
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model")
        assert mount["readOnly"] is True
    for workload in workloads(rendered["default"]):
        pod = workload["spec"]["template"]["spec"]
        assert "initContainers" not in pod
        model = next(v for v in pod["volumes"] if v["name"] == "model")
        assert model["persistentVolumeClaim"] == {"claimName": "shard-model", "readOnly": True}


def test_nodes_run_unprivileged(rendered):
    for workload in workloads(rendered["default"]):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("sets, message", [
    (["regions[0].name=Europe"], "regions.0.name"),
    (["registry.enabled=false"], "set registry.address"),
    (["fullnameOverride=a-release-name-that-is-far-too-long-for-pods"], "fullnameOverride"),
    (["coordinator.ingress.enabled=true"], "coordinator.ingress.host is required"),
    (["coordinator.http.enabled=true"], "coordinator.http.apiKeySecret is required"),
], ids=["region-name", "no-registry", "long-name", "ingress-without-host", "http-without-keys"])
def test_bad_values_refused_with_a_reason(helm, sets, message):
    result = render(helm, sets=sets)
    assert result.returncode != 0
    assert message in result.stderr
