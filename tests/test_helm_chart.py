"""The Helm chart, rendered and linted by Helm's own library (PyPI helm-python-sdk): no cluster,
no helm binary. (The Dockerfile is checked by hadolint in `make lint`.)"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_python.chart import Chart, lint
from helm_python.errors import HelmRenderError

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "vla-inference"
RELEASE, NAMESPACE = "vla", "robots"
FULLNAME = f"{RELEASE}-vla-inference"

DESIGN = {  # the original design's block for the chart as a subchart
    "vlaInference": {
        "enabled": True,
        "modelType": "openvla",
        "device": "cuda",
        "resources": {"limits": {"nvidia.com/gpu": 2, "memory": "80Gi"}},
    }
}


def render(values: dict[str, Any] | None = None, chart: Path = CHART) -> dict[str, dict[str, Any]]:
    """{kind/name: manifest} of everything the chart renders."""
    rendered = Chart.load(chart).render(values or {}, name=RELEASE, namespace=NAMESPACE)
    manifests: dict[str, dict[str, Any]] = {}
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                manifests[f"{document['kind']}/{document['metadata']['name']}"] = document
    return manifests


def container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (server,) = manifests[f"Deployment/{FULLNAME}"]["spec"]["template"]["spec"]["containers"]
    return server


def env(manifests: dict[str, dict[str, Any]]) -> dict[str, str]:
    variables = [(e["name"], e["value"]) for e in container(manifests)["env"]]
    assert len(variables) == len(dict(variables)), "a variable is set twice"
    return dict(variables)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_default_values_lint_and_render_a_balanced_drainable_fleet():
    report = lint(str(CHART), {})
    assert not report["errors"]
    assert [m["error"] for m in report["messages"] if m["severity"] > 1] == []  # info only (icon)
    manifests = render()
    assert set(manifests) == {
        f"Deployment/{FULLNAME}",
        f"Service/{FULLNAME}",
        f"Service/{FULLNAME}-headless",
        f"PodDisruptionBudget/{FULLNAME}",
    }
    deployment = manifests[f"Deployment/{FULLNAME}"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["replicas"] >= 2
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    server = container(manifests)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9090}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == ports["grpc"], probe
    # Empty keys are not rendered (volumeMounts: / volumes: with nothing under them).
    assert "volumeMounts" not in server and "volumes" not in pod["spec"]
    variables = env(manifests)
    assert variables["VLA_MODEL_TYPE"] == "pi0" and variables["VLA_DEVICE"] == "cuda"
    assert variables["VLA_HOST"] == "0.0.0.0"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1

    # Drain: preStop sleep, then SIGTERM and VLA_SHUTDOWN_GRACE_S; Kubernetes waits for both.
    pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = float(variables["VLA_SHUTDOWN_GRACE_S"])
    assert grace > 0
    assert pod["spec"]["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + grace + 5

    for name in (FULLNAME, f"{FULLNAME}-headless"):
        service = manifests[f"Service/{name}"]
        assert selects(service["spec"]["selector"], pod["metadata"]["labels"]), name
        grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["targetPort"] == "grpc" and grpc_port["port"] == 50051
    headless = manifests[f"Service/{FULLNAME}-headless"]["spec"]
    assert headless["clusterIP"] == "None"
    assert [p["name"] for p in headless["ports"]] == ["grpc"]  # scraped once, through the other
    assert manifests[f"Service/{FULLNAME}"]["spec"]["type"] == "ClusterIP"
    pdb = manifests[f"PodDisruptionBudget/{FULLNAME}"]["spec"]
    assert pdb["maxUnavailable"] == 1
    assert selects(pdb["selector"]["matchLabels"], pod["metadata"]["labels"])


def test_notes_name_the_headless_target():
    notes = Chart.load(CHART).render({}, name=RELEASE, namespace=NAMESPACE)[
        "vla-inference/templates/NOTES.txt"
    ]
    assert f"dns:///{FULLNAME}-headless.{NAMESPACE}.svc.cluster.local:50051" in notes


def test_replicas_with_queue_autoscaling_service_monitor_and_network_policy():
    values = {
        "replicaCount": 4,
        "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12, "targetQueueDepth": 6},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "networkPolicy": {"enabled": True},
        "drain": {"preStopSleepSeconds": 10, "graceSeconds": 45, "marginSeconds": 5},
    }
    assert not lint(str(CHART), values)["errors"]
    manifests = render(values)
    deployment = manifests[f"Deployment/{FULLNAME}"]
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert "annotations" not in pod["metadata"]  # scraped by the ServiceMonitor, not twice

    scaled = manifests[f"ScaledObject/{FULLNAME}"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (3, 12)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    query = trigger["metadata"]["query"]
    assert query.startswith("sum(vla_queue_depth{") and f'namespace="{NAMESPACE}"' in query
    assert f'service="{FULLNAME}"' in query  # the Service the ServiceMonitor scrapes through
    assert trigger["metadata"]["threshold"] == "6"
    scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert scale_down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 60}]

    monitor = manifests[f"ServiceMonitor/{FULLNAME}"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    service = manifests[f"Service/{FULLNAME}"]
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert "metrics" in {p["name"] for p in service["spec"]["ports"]}

    policy = manifests[f"NetworkPolicy/{FULLNAME}"]["spec"]
    assert selects(policy["podSelector"]["matchLabels"], labels)
    assert [r["ports"][0]["port"] for r in policy["ingress"]] == ["grpc", "metrics"]

    server = container(manifests)
    assert env(manifests)["VLA_SHUTDOWN_GRACE_S"] == "45"
    assert server["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "10"]
    assert pod["spec"]["terminationGracePeriodSeconds"] == 60


def test_termination_grace_shorter_than_the_drain_is_refused():
    with pytest.raises(HelmRenderError, match="terminationGracePeriodSeconds=15 is shorter"):
        render({"terminationGracePeriodSeconds": 15})  # preStop 5 + grace 20 do not fit
    manifests = render({"terminationGracePeriodSeconds": 90})
    assert (
        manifests[f"Deployment/{FULLNAME}"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90
    )


def test_tls_tokens_and_checkpoint_volume():
    values = {
        "tlsSecret": "vla-tls",
        "mutualTLS": True,
        "authTokenSecret": "vla-tokens",
        "modelVolume": {"claimName": "pi0-checkpoint", "mountPath": "/models"},
        "env": {"VLA_MODEL_PATH": "/models/pi05_droid"},
    }
    manifests = render(values)
    server = container(manifests)
    variables = env(manifests)
    assert variables["VLA_TLS_CERT_FILE"] == "/etc/vla/tls/tls.crt"
    assert variables["VLA_TLS_KEY_FILE"] == "/etc/vla/tls/tls.key"
    assert variables["VLA_TLS_CLIENT_CA_FILE"] == "/etc/vla/tls/ca.crt"
    assert variables["VLA_AUTH_TOKEN_FILE"] == "/etc/vla/auth/tokens"
    assert variables["VLA_MODEL_PATH"] == "/models/pi05_droid"
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    volumes = {
        v["name"]: v for v in manifests[f"Deployment/{FULLNAME}"]["spec"]["template"]["spec"]["volumes"]
    }
    assert set(mounts) == set(volumes) == {"models", "auth", "tls"}
    assert all(m["readOnly"] for m in mounts.values())
    assert (
        mounts["tls"]["mountPath"] == "/etc/vla/tls" and volumes["tls"]["secret"]["secretName"] == "vla-tls"
    )
    assert volumes["auth"]["secret"]["secretName"] == "vla-tokens"
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "pi0-checkpoint"
    # Probes stay on the gRPC port: the standard health service needs no token (kubelet has none).
    assert server["readinessProbe"]["grpc"]["port"] == 50051


def test_original_design_values_given_to_the_chart():
    manifests = render(DESIGN)
    variables = env(manifests)
    assert (variables["VLA_MODEL_TYPE"], variables["VLA_DEVICE"]) == ("openvla", "cuda")
    limits = container(manifests)["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 2 and limits["memory"] == "80Gi"
    assert container(manifests)["resources"]["requests"]["cpu"] == "4"  # merged over the defaults
    cpu = render({"vlaInference": {"enabled": True, "modelType": "pi0", "device": "cpu"}})
    assert env(cpu)["VLA_DEVICE"] == "cpu"
    assert "nvidia.com/gpu" not in container(cpu)["resources"]["limits"]  # schedulable without GPUs
    assert render({"vlaInference": {"enabled": False}}) == {}


def test_original_design_values_deploy_as_a_subchart(tmp_path: Path):
    parent = tmp_path / "robot-fleet"
    shutil.copytree(CHART, parent / "charts" / "vla-inference")
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    (parent / "Chart.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v2",
                "name": "robot-fleet",
                "version": "1.0.0",
                "dependencies": [
                    {
                        "name": "vla-inference",
                        "version": version,
                        "alias": "vlaInference",
                        "condition": "vlaInference.enabled",
                    }
                ],
            }
        )
    )
    (parent / "values.yaml").write_text(yaml.safe_dump(DESIGN))
    manifests = render(chart=parent)
    assert f"Service/{FULLNAME}-headless" in manifests  # names stay DNS-safe under the alias
    variables = env(manifests)
    assert (variables["VLA_MODEL_TYPE"], variables["VLA_DEVICE"]) == ("openvla", "cuda")
    assert container(manifests)["resources"]["limits"]["nvidia.com/gpu"] == 2
    labels = manifests[f"Deployment/{FULLNAME}"]["spec"]["template"]["metadata"]["labels"]
    assert selects(manifests[f"Service/{FULLNAME}"]["spec"]["selector"], labels)
    assert render({"vlaInference": {"enabled": False}}, chart=parent) == {}
