"""The Kubernetes manifests, checked without a cluster: render, validate, read.

``kubectl kustomize`` renders ``k8s/base`` and every overlay offline. Each rendered
document is validated against the OpenAPI schemas of one recent Kubernetes release
with kubernetes-validate in strict mode (an unknown or misspelt field is an error).
Then the rendered objects are read for what a deployment relies on: every
container's environment is accepted by its own ``audiosockets`` command (parsed by
the real click command, ConfigMap references resolved), recorders and processors
reach the relay Service, one relay that is replaced, never rolled, probes on the
metrics port, nobody runs as root, the restricted Pod Security Standard wherever
the namespace enforces it, and the README's commands and scrape job match.

``kubectl apply --dry-run`` cannot stand in for any of this: both its client and
server modes need a cluster to talk to.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from _support import require, require_binary
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.cli import main as cli_main
from audiosockets.processor import parse_spec
from audiosockets.sources import block_frames_for, parse_source
from audiosockets.urls import check_url, is_nats_url, parse_nats_url, parse_url

try:
    import kubernetes_validate
except ImportError:  # pragma: no cover - the `test` extra installs it
    kubernetes_validate = None

Doc = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
BASE = K8S / "base"
# Applied once before any overlay: the namespace and the archive's volume, so
# `kubectl delete -k` of an overlay keeps the recordings.
SETUP = K8S / "namespace"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
COMPONENTS = sorted(p.parent for p in (K8S / "components").glob("*/kustomization.yaml"))
NAMESPACE = "audiosockets"
# The privileged microphone recorder's own namespace (overlays/microphone).
MICROPHONE_NAMESPACE = "audiosockets-microphone"
# Custom resources of the Prometheus Operator and KEDA: the core schemas do not
# know them, so kubernetes-validate cannot check them; tests below read them.
CUSTOM_KINDS = {"PodMonitor", "PrometheusRule", "ScaledObject"}
# A recent release kubernetes-validate ships schemas for (it keeps about the last
# dozen); autoscaling/v2 and policy/v1 are long stable there.
KUBERNETES_VERSION = "1.33.0"

# The image's entrypoint is `tini -- audiosockets`; args[0] is the command.
IMAGE_OF_COMMAND = {
    "relay": "audiosockets/relay",
    "record": "audiosockets/recorder",
    "process": "audiosockets/processor",
}
# What each service cannot do without, beyond its flags' defaults: the image's
# defaults (relay at tcp://relay:7400) are for compose, so Kubernetes says it all.
NEEDED_ENV = {
    "relay": {"AUDIOSOCKETS_RELAY_LISTEN", "AUDIOSOCKETS_RELAY_METRICS_PORT"},
    "record": {
        "AUDIOSOCKETS_RECORD_RELAY",
        "AUDIOSOCKETS_RECORD_STREAM",
        "AUDIOSOCKETS_RECORD_SOURCE",
        "AUDIOSOCKETS_RECORD_SPOOL_SECONDS",
        "AUDIOSOCKETS_RECORD_METRICS_PORT",
    },
    "process": {
        "AUDIOSOCKETS_PROCESS_RELAY",
        "AUDIOSOCKETS_PROCESS_STREAM",
        "AUDIOSOCKETS_PROCESS_GROUP",
        "AUDIOSOCKETS_PROCESS_HANDLER",
        "AUDIOSOCKETS_PROCESS_METRICS_PORT",
    },
}
GLOBAL_ENV = "AUDIOSOCKETS_LOG_LEVEL"  # the group's --log-level
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "PriorityClass"}
WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet"}
MICROPHONE_LABEL = "audiosockets.io/microphone"
# Stand-ins for what the kubelet fills in through fieldRef.
FIELD_VALUES = {"spec.nodeName": "node-a", "metadata.name": "pod-a"}


# --- rendering -------------------------------------------------------------


@functools.cache
def _render(directory: Path) -> tuple[Doc, ...]:
    kubectl = require_binary("kubectl")
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        # Rendering must not depend on (or touch) any cluster configuration.
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    assert done.returncode == 0, f"kubectl kustomize {directory.relative_to(ROOT)}:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def render(directory: Path) -> list[Doc]:
    return list(_render(directory))


@pytest.fixture(params=OVERLAYS, ids=lambda p: p.name)
def overlay(request: pytest.FixtureRequest) -> list[Doc]:
    """One overlay's documents plus k8s/namespace's: a complete deployment."""
    return render(SETUP) + render(request.param)


# --- reading rendered objects ---------------------------------------------


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def ident(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def all_containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, container) for every container, init containers included."""
    for workload in workloads(docs):
        spec = pod_spec(workload)
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            yield workload, container


def containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, container) for every audiosockets container (not NATS servers)."""
    for workload, container in all_containers(docs):
        if str(container.get("image", "")).startswith("audiosockets/"):
            yield workload, container


def command_of(container: Doc) -> str:
    assert "command" not in container, "keep the image's entrypoint (tini is PID 1)"
    args = container.get("args") or []
    assert args, "args must start with a command"
    assert args[0] in IMAGE_OF_COMMAND, f"args must start with a command: {args}"
    return str(args[0])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def container_port(container: Doc, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert name in ports, f"container {container['name']} has no port named {name!r}"
    return int(ports[name])


_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def resolve_env(docs: list[Doc], container: Doc) -> dict[str, str]:
    """The container's environment as the kubelet would build it (fieldRefs faked)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        env.update(find(docs, "ConfigMap", ref).get("data", {}))
    for var in container.get("env", []):
        if "value" in var:
            # $(NAME) expands only when NAME was defined above; else it stays literal.
            value = _REFERENCE.sub(lambda m: env.get(m[1], m[0]), str(var["value"]))
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            data = find(docs, "ConfigMap", ref["name"]).get("data", {})
            assert ref["key"] in data, f"{var['name']}: ConfigMap {ref['name']} lacks {ref['key']}"
            value = str(data[ref["key"]])
        elif "fieldRef" in var["valueFrom"]:
            value = FIELD_VALUES[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            raise AssertionError(f"{var['name']}: unexpected env source {var['valueFrom']}")
        env[var["name"]] = value
    return env


def env_names_of(command: str) -> set[str]:
    params = cli_main.commands[command].params
    return {p.envvar for p in params if isinstance(p, click.Option) and isinstance(p.envvar, str)}


def relay_service(docs: list[Doc]) -> Doc:
    return find(docs, "Service", "relay")


def relay_workload(docs: list[Doc]) -> Doc:
    relays = [w for w, c in containers(docs) if command_of(c) == "relay"]
    if not relays and of_kind(docs, "StatefulSet"):
        pytest.skip("this overlay has no relay: its clients use NATS")
    (relay,) = relays
    return relay


# --- render and validate ---------------------------------------------------


def test_the_overlays_exist() -> None:
    assert {p.name for p in OVERLAYS} >= {"edge-demo", "microphone"}


@pytest.mark.parametrize("directory", [SETUP, BASE, *OVERLAYS], ids=lambda p: p.name)
def test_renders_and_matches_the_kubernetes_schemas(directory: Path) -> None:
    docs = render(directory)
    require(kubernetes_validate is not None, "kubernetes-validate is not installed")
    problems = []
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            # No schema for custom resources in kubernetes-validate: the
            # operator's and KEDA's CRDs validate them in a cluster; the
            # tests below check the fields we rely on.
            assert doc["apiVersion"] in ("monitoring.coreos.com/v1", "keda.sh/v1alpha1"), ident(doc)
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{ident(doc)}: {exc.message} at {list(exc.path)}")
    assert not problems, "\n".join(problems)


def test_the_validator_rejects_what_the_api_server_would() -> None:
    # Guards the test above against a validator that passes everything.
    require(kubernetes_validate is not None, "kubernetes-validate is not installed")
    relay = relay_workload(render(OVERLAYS[0]))
    misspelt = yaml.safe_load(yaml.safe_dump(relay))
    pod_spec(misspelt)["containers"][0]["enviroment"] = []
    wrong_type = yaml.safe_load(yaml.safe_dump(relay))
    wrong_type["spec"]["replicas"] = "one"
    for bad in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_everything_lives_in_the_namespace_but_a_privileged_recorder(overlay: list[Doc]) -> None:
    find(overlay, "Namespace", NAMESPACE)
    privileged = {
        ident(w) for w, c in containers(overlay) if c.get("securityContext", {}).get("privileged")
    }
    for doc in overlay:
        if doc["kind"] in CLUSTER_SCOPED:
            continue
        namespace = doc["metadata"].get("namespace")
        if namespace == MICROPHONE_NAMESPACE:
            # Only the microphone recorder (privileged or device plugin), its
            # settings and its network policy.
            assert doc["kind"] in ("DaemonSet", "ConfigMap", "NetworkPolicy"), ident(doc)
            find(overlay, "Namespace", MICROPHONE_NAMESPACE)
        else:
            assert namespace == NAMESPACE, ident(doc)
            assert ident(doc) not in privileged, f"{ident(doc)} is privileged in {NAMESPACE}"


@pytest.mark.parametrize("directory", OVERLAYS, ids=lambda p: p.name)
def test_deleting_an_overlay_keeps_the_namespace_and_the_archive(directory: Path) -> None:
    # `kubectl delete -k` deletes what the overlay renders: not these.
    kept = [d for d in render(directory) if d["kind"] == "PersistentVolumeClaim"]
    kept += [
        d
        for d in render(directory)
        if d["kind"] == "Namespace" and d["metadata"]["name"] == NAMESPACE
    ]
    assert not kept, [ident(d) for d in kept]
    assert {ident(d) for d in render(SETUP)} == {
        f"Namespace/{NAMESPACE}",
        "PersistentVolumeClaim/archive",
    }


def test_images_and_labels_are_the_release_of_this_checkout(overlay: list[Doc]) -> None:
    # (k8s/namespace's objects are in `overlay` too: labelled by the same component.)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for workload, container in containers(overlay):
        expected = f"{IMAGE_OF_COMMAND[command_of(container)]}:{version}"
        assert container["image"] == expected, ident(workload)
    for doc in overlay:
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "audiosockets", ident(doc)
        assert labels.get("app.kubernetes.io/version") == version, ident(doc)


# --- environment -------------------------------------------------------------


def test_every_audiosockets_variable_is_a_flag_of_its_command(overlay: list[Doc]) -> None:
    for workload, container in containers(overlay):
        command = command_of(container)
        known = env_names_of(command) | {GLOBAL_ENV}
        if command == "relay":
            # `kubectl exec deploy/relay -- audiosockets status` (overlays/secure).
            known |= env_names_of("status")
        names = {v["name"] for v in container.get("env", [])}
        unknown = {n for n in names if n.startswith("AUDIOSOCKETS_")} - known
        assert not unknown, f"{ident(workload)}: {command} has no flag for {sorted(unknown)}"


def test_every_container_sets_what_its_service_needs(overlay: list[Doc]) -> None:
    for workload, container in containers(overlay):
        env = resolve_env(overlay, container)
        missing = ({GLOBAL_ENV} | NEEDED_ENV[command_of(container)]) - {
            name for name, value in env.items() if value
        }
        assert not missing, f"{ident(workload)} does not set {sorted(missing)}"


def test_references_to_other_variables_resolve(overlay: list[Doc]) -> None:
    # $(NODE_NAME) only expands if NODE_NAME is defined earlier in the list.
    for workload, container in containers(overlay):
        for name, value in resolve_env(overlay, container).items():
            assert "$(" not in value, f"{ident(workload)}: {name}={value!r} is not expanded"


def test_every_container_environment_is_accepted_by_its_command(
    overlay: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the service itself does at start: click reads the variables and
    # converts them (ranges, choices, required options), then the values that
    # click keeps as text are parsed the way the service parses them.
    for workload, container in containers(overlay):
        command = command_of(container)
        env = resolve_env(overlay, container)
        for name in list(os.environ):
            if name.startswith("AUDIOSOCKETS_"):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        try:
            cli_main.make_context("audiosockets", [command])
            params = cli_main.commands[command].make_context(command, []).params
        except click.ClickException as exc:
            raise AssertionError(f"{ident(workload)}: {exc.format_message()}") from None
        if command in ("record", "process"):
            check_url(params["relay_url"])
        if command == "process":
            parse_spec(params["handler_spec"])
        if command == "record":
            source = str(params["source"])
            kind = source.partition(":")[0]
            assert kind in ("device", "file", "synth"), f"{ident(workload)}: {source}"
            if kind == "synth":  # device and file sources would open something
                fmt = AudioFormat(
                    params["rate"], params["channels"], SampleType.parse(params["dtype"])
                )
                parse_source(source, fmt, block_frames_for(params["rate"], params["block_ms"]))


# --- the relay ---------------------------------------------------------------


def test_recorders_and_processors_reach_the_relay_service(overlay: list[Doc]) -> None:
    relay_workload(overlay)  # skips an overlay without a relay
    service = relay_service(overlay)
    namespace = service["metadata"]["namespace"]
    service_ports = {p["port"]: p for p in service["spec"]["ports"]}
    relay_container = pod_spec(relay_workload(overlay))["containers"][0]
    clients = 0
    for workload, container in containers(overlay):
        command = command_of(container)
        if command == "relay":
            continue
        clients += 1
        url = resolve_env(overlay, container)[f"AUDIOSOCKETS_{command.upper()}_RELAY"]
        address = parse_url(url)
        labels = address.host.split(".")
        # relay, relay.NS, relay.NS.svc or relay.NS.svc.<cluster domain>
        assert labels[0] == service["metadata"]["name"], f"{ident(workload)}: {url}"
        if len(labels) > 1:
            assert labels[1] == namespace, f"{ident(workload)}: {url} is another namespace"
            assert len(labels) == 2 or labels[2] == "svc", f"{ident(workload)}: {url}"
        assert address.port in service_ports, f"{ident(workload)}: {url}"
        target = service_ports[address.port]["targetPort"]
        assert target in ("relay", 7400), target
        assert container_port(relay_container, "relay") == 7400
    assert clients >= 4  # a recorder and the three processors


def test_relay_service_exposes_protocol_and_metrics(overlay: list[Doc]) -> None:
    relay_workload(overlay)  # skips an overlay without a relay
    service = relay_service(overlay)
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {7400, 9400}
    relay = relay_workload(overlay)
    labels = relay["spec"]["template"]["metadata"]["labels"]
    container = pod_spec(relay)["containers"][0]
    for port, name in ((7400, "relay"), (9400, "metrics")):
        assert ports[port].get("protocol", "TCP") == "TCP"
        target = ports[port]["targetPort"]
        assert target in (name, port)
        assert container_port(container, name) == port
    # The Service selects the relay's pods and no other pods.
    selector = service["spec"]["selector"]
    assert selects(selector, labels)
    others = [w for w in workloads(overlay) if w is not relay]
    assert not [w for w in others if selects(selector, w["spec"]["template"]["metadata"]["labels"])]
    env = resolve_env(overlay, container)
    listen = parse_url(env["AUDIOSOCKETS_RELAY_LISTEN"])  # tcp:// or, overlays/secure, tls://
    assert (listen.host, listen.port) == ("0.0.0.0", 7400)


def test_one_relay_replaced_never_rolled_or_scaled(overlay: list[Doc]) -> None:
    relay = relay_workload(overlay)
    assert relay["kind"] == "Deployment"
    assert relay["spec"]["replicas"] == 1
    assert relay["spec"]["strategy"]["type"] == "Recreate"
    targets = {
        h["spec"]["scaleTargetRef"]["name"] for h in of_kind(overlay, "HorizontalPodAutoscaler")
    }
    assert relay["metadata"]["name"] not in targets


# --- processors ----------------------------------------------------------------


def processors(docs: list[Doc]) -> dict[str, tuple[Doc, dict[str, str]]]:
    """handler name -> (workload, resolved env) for every processor."""
    found = {}
    for workload, container in containers(docs):
        if command_of(container) == "process":
            env = resolve_env(docs, container)
            name = parse_spec(env["AUDIOSOCKETS_PROCESS_HANDLER"]).name
            assert name not in found, f"two processors run {name}"
            found[name] = (workload, env)
    return found


def test_level_vad_and_archive_processors_each_form_a_group(overlay: list[Doc]) -> None:
    found = processors(overlay)
    assert set(found) >= {"level", "vad", "archive"}
    for name, (workload, env) in found.items():
        # In a group even when alone: a replacement pod resumes after the
        # group's last acknowledged chunk instead of at live audio.
        assert env["AUDIOSOCKETS_PROCESS_GROUP"] == name, ident(workload)
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels.get("audiosockets.io/handler") == name, ident(workload)


def max_streams(docs: list[Doc]) -> int:
    """The stream count the deployment is sized for (the relay's annotation)."""
    return int(relay_workload(docs)["metadata"]["annotations"]["audiosockets.io/max-streams"])


def scalers_of(docs: list[Doc], workload: Doc) -> list[Doc]:
    name = workload["metadata"]["name"]
    return [
        d
        for d in docs
        if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
        and d["spec"]["scaleTargetRef"]["name"] == name
    ]


def test_level_autoscales_from_two_replicas_up_to_one_per_stream(overlay: list[Doc]) -> None:
    level, _ = processors(overlay)["level"]
    (scaler,) = scalers_of(overlay, level)  # one owner of the count, never two
    spec = scaler["spec"]
    assert spec["scaleTargetRef"]["kind"] == level["kind"] == "Deployment"
    if scaler["kind"] == "HorizontalPodAutoscaler":
        (metric,) = spec["metrics"]
        assert metric["type"] == "Resource"
        assert metric["resource"]["name"] == "cpu"
        # Utilization is measured against the request: there must be one.
        assert pod_spec(level)["containers"][0]["resources"]["requests"]["cpu"]
        bounds = (spec["minReplicas"], spec["maxReplicas"])
    else:
        # KEDA on the level replicas' own backlog, as the PodMonitor labels it.
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus"
        query = trigger["metadata"]["query"]
        assert "audiosockets_queue_depth_chunks" in query
        assert 'audiosockets_handler="level"' in query
        assert float(trigger["metadata"]["threshold"]) > 0
        bounds = (spec["minReplicaCount"], spec["maxReplicaCount"])
    # A group gives each stream to one member: replicas beyond the streams idle.
    assert bounds == (2, max_streams(overlay))
    # The autoscaler owns the count; a fixed one would be reset on every apply.
    assert "replicas" not in level["spec"]


def test_the_keda_scaler_selects_a_label_the_pod_monitor_sets() -> None:
    docs = render(K8S / "overlays" / "edge-demo-monitored")
    (monitor,) = of_kind(docs, "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    targets = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert targets["audiosockets_handler"] == [
        "__meta_kubernetes_pod_label_audiosockets_io_handler"
    ]
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/component"
    assert endpoint["port"] == "metrics"
    assert set(monitor["spec"]["namespaceSelector"]["matchNames"]) == {
        NAMESPACE,
        MICROPHONE_NAMESPACE,
    }
    assert not of_kind(docs, "HorizontalPodAutoscaler"), "KEDA makes its own HPA"


def test_archive_is_one_replica_on_a_read_write_once_volume(overlay: list[Doc]) -> None:
    archive, env = processors(overlay)["archive"]
    assert archive["spec"]["replicas"] == 1
    assert archive["spec"]["strategy"]["type"] == "Recreate"
    spec = pod_spec(archive)
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in spec.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    directory = parse_spec(env["AUDIOSOCKETS_PROCESS_HANDLER"]).arg
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == directory]
    assert not mount.get("readOnly", False)
    claim = find(overlay, "PersistentVolumeClaim", claims[mount["name"]])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert spec["securityContext"].get("fsGroup") == spec["securityContext"]["runAsGroup"]


def test_disruption_budgets_only_where_replicas_can_cover_for_each_other(
    overlay: list[Doc],
) -> None:
    budgets = of_kind(overlay, "PodDisruptionBudget")
    for workload in workloads(overlay):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], labels)]
        scalers = scalers_of(overlay, workload)
        least = (
            scalers[0]["spec"].get("minReplicas", scalers[0]["spec"].get("minReplicaCount", 1))
            if scalers
            else workload["spec"].get("replicas", 1)
        )
        if workload["kind"] == "DaemonSet" or least < 2:
            # For one pod a budget either blocks every drain or protects nothing.
            assert not covering, f"{ident(workload)}: a budget for a single replica"
            continue
        assert len(covering) == 1, ident(workload)
        # minAvailable equal to the replica count would block every drain.
        assert covering[0]["spec"].get("maxUnavailable", 0) >= 1, ident(covering[0])
    assert budgets, "the level processor (two or more replicas) has a budget"


# --- recorders -------------------------------------------------------------------


def recorders(docs: list[Doc]) -> list[tuple[Doc, Doc, dict[str, str]]]:
    return [(w, c, resolve_env(docs, c)) for w, c in containers(docs) if command_of(c) == "record"]


def has_sound_devices(workload: Doc, container: Doc) -> bool:
    spec = pod_spec(workload)
    host_snd = any(v.get("hostPath", {}).get("path") == "/dev/snd" for v in spec.get("volumes", []))
    privileged = bool(container.get("securityContext", {}).get("privileged"))
    plugin = any("/" in r for r in container.get("resources", {}).get("limits", {}))
    return (host_snd and privileged) or plugin


def test_each_stream_has_exactly_one_publisher(overlay: list[Doc]) -> None:
    assert recorders(overlay), "no recorder in this overlay"
    streams = []
    for workload, container, env in recorders(overlay):
        raw = {v["name"]: v.get("value", "") for v in container["env"]}
        if workload["kind"] == "DaemonSet":
            # One pod per node: the stream name must differ per node.
            assert "$(" in raw["AUDIOSOCKETS_RECORD_STREAM"], ident(workload)
        else:
            assert workload["spec"]["replicas"] == 1, ident(workload)
            assert workload["spec"]["strategy"]["type"] == "Recreate", ident(workload)
        streams.append(env["AUDIOSOCKETS_RECORD_STREAM"])
    assert len(streams) == len(set(streams))


def test_microphone_recorders_run_where_the_microphone_is(overlay: list[Doc]) -> None:
    for workload, container, env in recorders(overlay):
        spec = pod_spec(workload)
        if env["AUDIOSOCKETS_RECORD_SOURCE"].startswith("device"):
            assert spec.get("nodeSelector", {}).get(MICROPHONE_LABEL) == "true", ident(workload)
            assert has_sound_devices(workload, container), ident(workload)
            # /dev/snd/* are root:audio 0660 and the recorder is not root.
            assert spec["securityContext"].get("supplementalGroups"), ident(workload)
        else:
            assert not has_sound_devices(workload, container), ident(workload)
            assert not any("hostPath" in v for v in spec.get("volumes", [])), ident(workload)


# --- every pod -------------------------------------------------------------------


def effective(workload: Doc, container: Doc, key: str) -> Any:
    """A securityContext field as it applies: the container's, else the pod's."""
    own = container.get("securityContext", {})
    return own[key] if key in own else pod_spec(workload).get("securityContext", {}).get(key)


def test_no_container_runs_as_root(overlay: list[Doc]) -> None:
    for workload, container in all_containers(overlay):
        where = f"{ident(workload)}/{container['name']}"
        assert effective(workload, container, "runAsNonRoot") is True, where
        uid = effective(workload, container, "runAsUser")
        assert isinstance(uid, int), where
        assert uid > 0, where
        assert effective(workload, container, "runAsGroup") != 0, where


def lockdown_problems(workload: Doc, container: Doc) -> list[str]:
    """What one container lacks of the lockdown every workload has (empty: nothing)."""
    problems = []
    context = container.get("securityContext", {})
    if context.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    if context.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("capabilities.drop is not [ALL]")
    if context.get("capabilities", {}).get("add"):
        problems.append("adds capabilities")
    if effective(workload, container, "runAsNonRoot") is not True:
        problems.append("runAsNonRoot is not true")
    uid = effective(workload, container, "runAsUser")
    if not isinstance(uid, int) or uid <= 0:
        problems.append(f"runAsUser is {uid!r}")
    seccomp = effective(workload, container, "seccompProfile") or {}
    if seccomp.get("type") != "RuntimeDefault":
        problems.append("seccompProfile is not RuntimeDefault")
    if context.get("privileged"):
        # Only the microphone recorder of overlays/microphone (/dev/snd from a
        # hostPath opens only there; overlays/microphone-device-plugin needs no
        # privilege), and the API server refuses privileged together with
        # allowPrivilegeEscalation false.
        if not (workload["metadata"].get("namespace") == MICROPHONE_NAMESPACE and
                command_of(container) == "record"):  # fmt: skip
            problems.append("privileged outside the microphone recorder's namespace")
        if context.get("allowPrivilegeEscalation", True) is not True:
            problems.append("privileged with allowPrivilegeEscalation false (refused)")
    elif context.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if pod_spec(workload).get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken is not false")
    return problems


def test_containers_are_locked_down(overlay: list[Doc]) -> None:
    problems = [
        f"{ident(workload)}/{container['name']}: {problem}"
        for workload, container in all_containers(overlay)
        for problem in lockdown_problems(workload, container)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("where", "key", "bad"),
    [
        ("container", "readOnlyRootFilesystem", False),
        ("container", "readOnlyRootFilesystem", None),
        ("container", "allowPrivilegeEscalation", True),
        ("container", "allowPrivilegeEscalation", None),
        ("container", "capabilities", {"drop": ["NET_RAW"]}),
        ("container", "capabilities", {"drop": ["ALL"], "add": ["NET_ADMIN"]}),
        ("container", "runAsNonRoot", False),
        ("container", "runAsUser", 0),
        ("pod", "runAsNonRoot", None),
        ("container", "privileged", True),
    ],
)
def test_the_lockdown_check_catches_each_missing_protection(where: str, key: str, bad: Any) -> None:
    # Guards the test above against a check that passes everything.
    relay = relay_workload(render(OVERLAYS[0]))
    assert lockdown_problems(relay, pod_spec(relay)["containers"][0]) == []
    broken = yaml.safe_load(yaml.safe_dump(relay))
    container = pod_spec(broken)["containers"][0]
    context = (
        container["securityContext"]
        if where == "container"
        else pod_spec(broken)["securityContext"]
    )
    if bad is None:
        context.pop(key, None)
    else:
        context[key] = bad
    if where == "pod":
        container["securityContext"].pop(key, None)
    assert lockdown_problems(broken, container), f"{where} {key}={bad!r} passed"


def test_namespace_enforces_restricted_unless_a_pod_needs_privilege(overlay: list[Doc]) -> None:
    # The main namespace is "restricted" in every overlay; only a namespace of
    # the privileged recorder's own may enforce less.
    assert (
        find(overlay, "Namespace", NAMESPACE)["metadata"]["labels"][
            "pod-security.kubernetes.io/enforce"
        ]
        == "restricted"
    )
    for namespace in of_kind(overlay, "Namespace"):
        name = namespace["metadata"]["name"]
        labels = namespace["metadata"]["labels"]
        inside = [w for w in workloads(overlay) if w["metadata"].get("namespace") == name]
        privileged = [
            ident(w)
            for w in inside
            for c in pod_spec(w)["containers"]
            if c.get("securityContext", {}).get("privileged")
        ]
        host_paths = [
            ident(w) for w in inside if any("hostPath" in v for v in pod_spec(w).get("volumes", []))
        ]
        assert labels["pod-security.kubernetes.io/warn"] == "restricted", name
        if privileged:
            assert labels["pod-security.kubernetes.io/enforce"] == "privileged", name
        else:
            assert labels["pod-security.kubernetes.io/enforce"] == "restricted", name
            assert not host_paths, host_paths


# --- priority and sizing ------------------------------------------------------------


def test_relay_and_recorders_have_a_priority_class_that_exists(overlay: list[Doc]) -> None:
    classes = {d["metadata"]["name"]: d for d in of_kind(overlay, "PriorityClass")}
    for workload, container in containers(overlay):
        name = pod_spec(workload).get("priorityClassName")
        if command_of(container) in ("relay", "record"):
            assert name in classes, f"{ident(workload)}: priorityClassName {name!r}"
            assert 0 < classes[name]["value"] < 1_000_000_000, name  # below system classes
            assert classes[name].get("globalDefault", False) is False, name
        else:
            assert name is None, f"{ident(workload)}: processors keep the default priority"


#: Bytes one second of one stream holds in the relay, per byte of payload: the
#: Python objects of a 20 ms chunk roughly double it (k8s/README.md).
RELAY_OVERHEAD = 2
RELAY_BASE_BYTES = 64 << 20


def quantity_bytes(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * factor
    return int(text)


def test_relay_is_guaranteed_and_sized_for_its_streams(overlay: list[Doc]) -> None:
    relay = relay_workload(overlay)
    container = pod_spec(relay)["containers"][0]
    resources = container["resources"]
    # Guaranteed QoS: requests equal limits for cpu and memory.
    assert resources["requests"] == resources["limits"], resources
    env = resolve_env(overlay, container)
    settings = find_settings(overlay)
    window = float(env["AUDIOSOCKETS_RELAY_REPLAY_SECONDS"]) + float(
        env["AUDIOSOCKETS_RELAY_QUEUE_SECONDS"]
    )
    per_stream = int(settings["record-rate"]) * int(settings["record-channels"]) * 2  # int16
    needed = RELAY_BASE_BYTES + max_streams(overlay) * window * per_stream * RELAY_OVERHEAD
    assert quantity_bytes(resources["limits"]["memory"]) >= needed


def find_settings(docs: list[Doc]) -> dict[str, str]:
    (settings,) = [
        d
        for d in of_kind(docs, "ConfigMap")
        if d["metadata"]["name"].startswith("audiosockets-settings")
        and d["metadata"]["namespace"] == NAMESPACE
    ]
    return dict(settings["data"])


def written_paths(env: dict[str, str]) -> list[str]:
    """Directories a service writes to, by its configuration."""
    paths = [env.get("AUDIOSOCKETS_RECORD_SPOOL_DIR", "")]
    events = env.get("AUDIOSOCKETS_PROCESS_EVENTS", "")
    paths.append(str(Path(events).parent) if events else "")
    handler = env.get("AUDIOSOCKETS_PROCESS_HANDLER")
    if handler and parse_spec(handler).target == "archive":
        paths.append(parse_spec(handler).arg or "")
    return [p for p in paths if p]


def test_what_a_service_writes_lands_on_a_writable_volume(overlay: list[Doc]) -> None:
    # The root filesystem is read-only: a spool or archive directory that is
    # not a mounted volume fails at the first write, long after the rollout.
    for workload, container in containers(overlay):
        mounts = {
            m["mountPath"]: m for m in container.get("volumeMounts", []) if not m.get("readOnly")
        }
        for path in written_paths(resolve_env(overlay, container)):
            covering = [m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")]
            assert covering, f"{ident(workload)} writes {path}, which is not a writable volume"


#: What each probe asks (audiosockets/health.py): liveness and startup, the event
#: loop's heartbeat; readiness, the service's own readiness. Not /metrics: it is
#: served from another thread and answers while the loop is wedged.
PROBE_PATHS = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}


def test_probes_ask_the_health_endpoints(overlay: list[Doc]) -> None:
    for workload, container in containers(overlay):
        where = f"{ident(workload)}/{container['name']}"
        for probe in ("readinessProbe", "livenessProbe"):
            assert probe in container, f"{where} has no {probe}"
        for probe, path in PROBE_PATHS.items():
            if probe not in container:
                continue
            # Not a bare TCP connect to the relay's protocol port: the relay
            # counts a client that never says HELLO as a protocol error.
            get = container[probe].get("httpGet")
            assert get is not None, f"{where}: {probe} is not an HTTP GET of {path}"
            assert get["path"] == path, f"{where}: {probe}"
            assert get["port"] in ("metrics", container_port(container, "metrics")), where


def test_metrics_port_is_served_declared_and_annotated(overlay: list[Doc]) -> None:
    for workload, container in containers(overlay):
        command = command_of(container)
        env = resolve_env(overlay, container)
        port = int(env[f"AUDIOSOCKETS_{command.upper()}_METRICS_PORT"])
        assert port == container_port(container, "metrics"), ident(workload)
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", ident(workload)
        assert annotations.get("prometheus.io/port") == str(port), ident(workload)


def test_components_are_the_prometheus_jobs_the_dashboards_use(overlay: list[Doc]) -> None:
    scrape = yaml.safe_load((ROOT / "grafana" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in scrape["scrape_configs"]}
    for workload, container in containers(overlay):
        component = workload["spec"]["template"]["metadata"]["labels"][
            "app.kubernetes.io/component"
        ]
        assert component in jobs, ident(workload)
        assert IMAGE_OF_COMMAND[command_of(container)].endswith("/" + component), ident(workload)


def test_resources_and_grace_period_are_set(overlay: list[Doc]) -> None:
    for workload, container in all_containers(overlay):
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resource in resources.get(bound, {}), (
                    f"{ident(workload)}: {bound}.{resource}"
                )
        grace = pod_spec(workload).get("terminationGracePeriodSeconds")
        assert isinstance(grace, int), ident(workload)
        assert grace >= 10, ident(workload)


def test_workload_selectors_match_their_pods(overlay: list[Doc]) -> None:
    for workload in workloads(overlay):
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selects(selector, workload["spec"]["template"]["metadata"]["labels"]), ident(
            workload
        )
        others = [
            w
            for w in workloads(overlay)
            if w is not workload and selects(selector, w["spec"]["template"]["metadata"]["labels"])
        ]
        assert not others, f"{ident(workload)} also selects {[ident(w) for w in others]}"


# --- the README ------------------------------------------------------------------


README = K8S / "README.md"


def test_readme_shows_how_to_apply_each_overlay() -> None:
    text = README.read_text()
    mentioned = set(re.findall(r"kubectl apply -k k8s/overlays/([\w-]+)", text))
    assert mentioned == {p.name for p in OVERLAYS}


def relabel(labels: dict[str, str], rules: list[Doc]) -> dict[str, str] | None:
    """Prometheus relabelling, the ``keep`` and ``replace`` actions; None: dropped."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(n, "") for n in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if match is None:
                return None
        elif action == "replace":
            if match is not None:
                # Prometheus writes $1 or ${1}; Python's expand wants \g<1>.
                template = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", rule.get("replacement", "$1"))
                labels[rule["target_label"]] = match.expand(template)
        else:
            raise AssertionError(f"relabel action {action!r} is not simulated here")
    return labels


def scrape_targets(docs: list[Doc], rules: list[Doc]) -> list[dict[str, str]]:
    """What Prometheus's pod discovery would scrape: one candidate per container port."""
    kept = []
    for workload, container in containers(docs):
        template = workload["spec"]["template"]["metadata"]
        meta = {
            "__meta_kubernetes_pod_name": f"{workload['metadata']['name']}-0",
            **{
                "__meta_kubernetes_pod_label_" + re.sub(r"\W", "_", k): v
                for k, v in template["labels"].items()
            },
            **{
                "__meta_kubernetes_pod_annotation_" + re.sub(r"\W", "_", k): v
                for k, v in template.get("annotations", {}).items()
            },
        }
        for port in container.get("ports", []):
            candidate = {
                **meta,
                "__address__": f"10.0.0.1:{port['containerPort']}",
                "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                "job": "audiosockets",
            }
            target = relabel(candidate, rules)
            if target is not None:
                kept.append(target)
    return kept


def readme_scrape_job() -> Doc:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "kubernetes_sd_configs" in b]
    (job,) = yaml.safe_load(block)
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": [NAMESPACE]}}]
    return dict(job)


def test_readme_scrape_job_finds_each_metrics_port_once_under_its_job(
    overlay: list[Doc],
) -> None:
    targets = scrape_targets(overlay, readme_scrape_job()["relabel_configs"])
    expected = sorted(
        (
            f"10.0.0.1:{container_port(c, 'metrics')}",
            w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"],
        )
        for w, c in containers(overlay)
    )
    assert sorted((t["__address__"], t["job"]) for t in targets) == expected
    relay = {"relay"} if any(command_of(c) == "relay" for _, c in containers(overlay)) else set()
    assert {t["job"] for t in targets} == {"recorder", "processor"} | relay


def test_relabel_simulation_drops_what_it_should() -> None:
    # Guards the test above: an unannotated pod and a non-metrics port are dropped.
    rules = readme_scrape_job()["relabel_configs"]
    pod = {
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_pod_container_port_name": "metrics",
        "__meta_kubernetes_pod_label_app_kubernetes_io_component": "relay",
    }
    assert relabel(pod, rules) is not None
    assert (
        relabel({**pod, "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "false"}, rules)
        is None
    )
    assert relabel({**pod, "__meta_kubernetes_pod_container_port_name": "relay"}, rules) is None


# --- the monitoring component (grafana/kustomization.yaml) ---------------------------


GRAFANA = ROOT / "grafana"


def test_prometheus_rules_are_generated_from_the_rules_files_compose_uses() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prometheusrules", GRAFANA / "k8s" / "prometheusrules.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (GRAFANA / "k8s" / "prometheusrules.yaml").read_text()
    assert committed == module.render(), "rerun: python grafana/k8s/prometheusrules.py"
    # And the rendered objects carry exactly the groups Prometheus loads.
    rules = {
        d["metadata"]["name"]: d["spec"]["groups"]
        for d in of_kind(render(K8S / "overlays" / "edge-demo-monitored"), "PrometheusRule")
    }
    files = GRAFANA / "prometheus" / "rules"
    assert rules == {
        f"audiosockets-{p.stem}": yaml.safe_load(p.read_text())["groups"]
        for p in files.glob("*.yml")
    }


def test_dashboards_config_map_is_the_dashboards_compose_provisions() -> None:
    docs = render(K8S / "overlays" / "edge-demo-monitored")
    (dashboards,) = [
        d
        for d in of_kind(docs, "ConfigMap")
        if d["metadata"]["name"].startswith("audiosockets-dashboards")
    ]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    expected = {p.name: p.read_text() for p in (GRAFANA / "dashboards").glob("*.json")}
    assert dashboards["data"] == expected


def test_recorder_tolerations_are_optional_and_match_the_documented_taint(
    tmp_path: Path,
) -> None:
    # The component on top of the microphone overlay, as k8s/README.md says.
    overlay = tmp_path / "tainted"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "overlays" / "microphone", overlay)],
                "components": [
                    os.path.relpath(K8S / "components" / "recorder-tolerations", overlay)
                ],
            }
        )
    )
    (recorder,) = [w for w in workloads(render(overlay)) if w["kind"] == "DaemonSet"]
    (toleration,) = pod_spec(recorder)["tolerations"]
    assert toleration == {
        "key": MICROPHONE_LABEL,
        "operator": "Equal",
        "value": "true",
        "effect": "NoSchedule",
    }
    (plain,) = [
        w for w in workloads(render(K8S / "overlays" / "microphone")) if w["kind"] == "DaemonSet"
    ]
    assert "tolerations" not in pod_spec(plain)


# --- linter -------------------------------------------------------------------------

CHECKOV_CONFIG = K8S / ".checkov.yaml"
#: Accepted findings that must stay confined to one object (file stem -> resource).
CONFINED = {
    "CKV_K8S_16": {("microphone", "DaemonSet.audiosockets-microphone.recorder")},
    "CKV_K8S_20": {("microphone", "DaemonSet.audiosockets-microphone.recorder")},
}


def checkov_findings(directory: Path) -> dict[str, set[tuple[str, str]]]:
    """check id -> {(file stem, resource)} that checkov finds, with no check skipped."""
    checkov = require_binary("checkov")
    done = subprocess.run(
        [checkov, "-d", str(directory), "--framework", "kubernetes", "--skip-download",
         "--quiet", "--compact", "--output", "json"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )  # fmt: skip
    assert done.stdout.strip(), f"checkov printed nothing:\n{done.stderr[-2000:]}"
    reports = json.loads(done.stdout)
    found: dict[str, set[tuple[str, str]]] = {}
    for report in reports if isinstance(reports, list) else [reports]:
        for check in report["results"]["failed_checks"]:
            stem = Path(check["file_path"]).stem
            found.setdefault(check["check_id"], set()).add((stem, check["resource"]))
    return found


@pytest.mark.slow
def test_checkov_finds_only_the_accepted_and_justified_findings(tmp_path: Path) -> None:
    for directory in (SETUP, *OVERLAYS):
        docs = render(directory)
        (tmp_path / f"{directory.name}.yaml").write_text(yaml.safe_dump_all(docs))
    found = checkov_findings(tmp_path)
    accepted = set(yaml.safe_load(CHECKOV_CONFIG.read_text())["skip-check"])
    assert set(found) == accepted, (
        f"new findings: {sorted(set(found) - accepted)}; "
        f"listed but no longer found: {sorted(accepted - set(found))}"
    )
    for check, where in CONFINED.items():
        assert found[check] == where, f"{check} fires beyond {where}: {found[check]}"
    # Justified: every accepted check has a comment in the config saying why.
    text = CHECKOV_CONFIG.read_text()
    for check in accepted:
        assert re.search(rf"^\s*#.*{check}", text, flags=re.M), f"{check} has no reason"


def test_checkov_catches_a_bad_manifest(tmp_path: Path) -> None:
    # Guards the test above against a checkov that finds nothing.
    relay = relay_workload(render(OVERLAYS[0]))
    bad = yaml.safe_load(yaml.safe_dump(relay))
    pod_spec(bad)["containers"][0]["securityContext"]["privileged"] = True
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert "CKV_K8S_16" in checkov_findings(tmp_path)


# --- network policies ---------------------------------------------------------------

#: Pods that are not ours, as a cluster has them: Prometheus (the Operator's and
#: the community charts' label) in its own namespace, and strangers.
PROMETHEUS_POD = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
STRANGERS = [
    ("monitoring", {"app.kubernetes.io/name": "grafana"}),
    (NAMESPACE, {"app": "debug-shell"}),
    ("default", {"app.kubernetes.io/name": "audiosockets", "app.kubernetes.io/component": "x"}),
    ("default", {"app.kubernetes.io/component": "recorder"}),  # a recorder's label, elsewhere
]
Pod = tuple[str, dict[str, str]]  # (namespace, labels)


def label_selector_matches(selector: Doc, labels: dict[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist)."""
    if not selects(selector.get("matchLabels", {}), labels):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


def peer_admits(peer: Doc, policy_namespace: str, source: Pod) -> bool:
    namespace, labels = source
    # The namespace's automatic label is the only one a namespace selector here may rely on.
    namespace_labels = {"kubernetes.io/metadata.name": namespace}
    if "ipBlock" in peer:
        return False  # pods are not matched by address here
    if "namespaceSelector" in peer:
        if not label_selector_matches(peer["namespaceSelector"], namespace_labels):
            return False
    elif namespace != policy_namespace:
        return False
    return label_selector_matches(peer.get("podSelector", {}), labels)


def port_matches(rule_port: Doc, container: Doc, port_name: str) -> bool:
    wanted = rule_port.get("port")
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    return wanted is None or wanted in (port_name, container_port(container, port_name))


def admitted(docs: list[Doc], source: Pod, workload: Doc, container: Doc, port_name: str) -> bool:
    """Whether NetworkPolicy lets ``source`` open ``port_name`` of ``workload``'s pods."""
    namespace = workload["metadata"]["namespace"]
    labels = workload["spec"]["template"]["metadata"]["labels"]
    policies = [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if p["metadata"]["namespace"] == namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and label_selector_matches(p["spec"]["podSelector"], labels)
    ]
    if not policies:
        return True  # no policy selects the pod: all traffic allowed
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            ports = rule.get("ports")
            if peers is not None and not any(
                peer_admits(peer, namespace, source) for peer in peers
            ):
                continue
            if ports is not None and not any(port_matches(p, container, port_name) for p in ports):
                continue
            return True
    return False


def pods_of(docs: list[Doc]) -> list[tuple[Pod, Doc, Doc]]:
    """(pod as a traffic source, workload, container) for every container, NATS included."""
    return [
        ((w["metadata"]["namespace"], w["spec"]["template"]["metadata"]["labels"]), w, c)
        for w, c in all_containers(docs)
    ]


def component(workload: Doc) -> str:
    return str(workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])


def test_only_recorders_and_processors_reach_the_relays_protocol_port(overlay: list[Doc]) -> None:
    relay = relay_workload(overlay)
    relay_container = pod_spec(relay)["containers"][0]
    for source, workload, _ in pods_of(overlay):
        expected = component(workload) in ("recorder", "processor")
        got = admitted(overlay, source, relay, relay_container, "relay")
        assert got == expected, f"{ident(workload)} -> relay:7400 admitted={got}"
    for source in (PROMETHEUS_POD, *STRANGERS):
        assert not admitted(overlay, source, relay, relay_container, "relay"), source


def test_only_clients_reach_nats_and_only_its_servers_the_routes(overlay: list[Doc]) -> None:
    servers = [(w, c) for w, c in all_containers(overlay) if component(w) == "nats"]
    if not servers:
        pytest.skip("this overlay has no NATS servers")
    for nats, container in servers:
        if container["name"] != "nats":
            continue
        for source, workload, _ in pods_of(overlay):
            client = admitted(overlay, source, nats, container, "client")
            assert client == (component(workload) in ("recorder", "processor")), ident(workload)
            route = admitted(overlay, source, nats, container, "cluster")
            assert route == (component(workload) == "nats"), ident(workload)
        for source in (PROMETHEUS_POD, *STRANGERS):
            for port in ("client", "cluster", "monitor"):
                assert not admitted(overlay, source, nats, container, port), (source, port)


def test_only_prometheus_reaches_the_metrics_ports(overlay: list[Doc]) -> None:
    for _, workload, container in pods_of(overlay):
        if "metrics" not in {p.get("name") for p in container.get("ports", [])}:
            continue
        assert admitted(overlay, PROMETHEUS_POD, workload, container, "metrics"), ident(workload)
        for source in STRANGERS:
            assert not admitted(overlay, source, workload, container, "metrics"), (
                f"{source} -> {ident(workload)} metrics"
            )
        for peer, other, peer_container in pods_of(overlay):
            assert not admitted(overlay, peer, workload, container, "metrics"), (
                f"{ident(other)}/{peer_container['name']} -> {ident(workload)} metrics"
            )


def test_every_pod_is_selected_by_an_ingress_policy(overlay: list[Doc]) -> None:
    # A pod no policy selects takes traffic from anywhere, on any port.
    for _, workload, container in pods_of(overlay):
        for port in container.get("ports", []):
            assert not admitted(overlay, STRANGERS[1], workload, container, port["name"]), (
                f"{ident(workload)}:{port['name']} is open to any pod"
            )


def test_the_policy_simulation_admits_what_no_policy_restricts() -> None:
    # Guards the tests above: without the policies everything is admitted.
    docs = [d for d in render(OVERLAYS[0]) if d["kind"] != "NetworkPolicy"]
    relay = relay_workload(docs)
    relay_container = pod_spec(relay)["containers"][0]
    for source in (PROMETHEUS_POD, *STRANGERS):
        assert admitted(docs, source, relay, relay_container, "relay")
        assert admitted(docs, source, relay, relay_container, "metrics")


# --- overlays/secure ----------------------------------------------------------------

SECURE = K8S / "overlays" / "secure"
#: Each command's file options: where its TLS material and token come from.
SECURE_FILES = {
    "relay": ("TLS_CERT", "TLS_KEY", "TLS_CLIENT_CA", "CREDENTIALS"),
    "record": ("TLS_CA", "TLS_CERT", "TLS_KEY", "TOKEN_FILE"),
    "process": ("TLS_CA", "TLS_CERT", "TLS_KEY", "TOKEN_FILE"),
}

#: The Secret item each file option must come from (kubectl create secret tls
#: names them tls.crt and tls.key).
SECRET_KEY_OF = {
    "TLS_CERT": "tls.crt",
    "TLS_KEY": "tls.key",
    "TLS_CA": "ca.crt",
    "TLS_CLIENT_CA": "ca.crt",
    "CREDENTIALS": "credentials.toml",
    "TOKEN_FILE": "token",
}


def secret_file(workload: Doc, container: Doc, path: str) -> tuple[str, str, Doc]:
    """(Secret name, key, volume) that the file ``path`` of the container is made from."""
    spec = pod_spec(workload)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        assert "subPath" not in mount, f"{path}: a subPath mount is never refreshed"
        assert mount.get("readOnly") is True, path
        relative = path.removeprefix(prefix)
        volume = volumes[mount["name"]]
        sources = volume.get("projected", {}).get("sources", [])
        if "secret" in volume:
            sources = [{"secret": {"name": volume["secret"]["secretName"],
                                   "items": volume["secret"].get("items")}}]  # fmt: skip
        for source in sources:
            secret = source.get("secret")
            if secret is None:
                continue
            for item in secret.get("items") or []:
                if item["path"] == relative:
                    return secret["name"], item["key"], volume
        raise AssertionError(f"{path}: no Secret item in volume {mount['name']}")
    raise AssertionError(f"{path} is not in any mounted volume")


def test_secure_overlay_turns_on_tls_mutual_tls_and_credentials() -> None:
    docs = render(SETUP) + render(SECURE)
    seen_commands = set()
    for workload, container in containers(docs):
        command = command_of(container)
        seen_commands.add(command)
        env = resolve_env(docs, container)
        prefix = f"AUDIOSOCKETS_{command.upper()}_"
        url = env[prefix + ("LISTEN" if command == "relay" else "RELAY")]
        assert url.startswith("tls://"), f"{ident(workload)}: {url}"
        # No secret in the environment, only paths to files.
        assert prefix + "TOKEN" not in env, ident(workload)
        for option in SECURE_FILES[command]:
            path = env.get(prefix + option)
            assert path, f"{ident(workload)} lacks {prefix + option}"
            name, key, volume = secret_file(workload, container, path)
            mode = volume.get("projected", volume.get("secret", {})).get("defaultMode")
            assert mode == 0o440, f"{ident(workload)}: {name} mode {mode!r}"
            # Readable by the service's group (fsGroup), by nobody else.
            security = pod_spec(workload)["securityContext"]
            assert security.get("fsGroup") == security["runAsGroup"], ident(workload)
            # The right item: a key where a key is wanted, the CA where the CA is.
            assert key == SECRET_KEY_OF[option], f"{ident(workload)}: {option} is {name}/{key}"
    assert seen_commands == {"relay", "record", "process"}


def test_secure_overlay_gives_status_in_the_relay_pod_an_admin_identity() -> None:
    docs = render(SECURE)
    relay = relay_workload(docs)
    container = pod_spec(relay)["containers"][0]
    env = resolve_env(docs, container)
    # `kubectl exec deploy/relay -- audiosockets status` dials the relay inside
    # the pod (the network policy admits no other pod to the protocol port).
    assert parse_url(env["AUDIOSOCKETS_STATUS_RELAY"]).host == "localhost"
    for option in ("TLS_CA", "TLS_CERT", "TLS_KEY", "TOKEN_FILE"):
        name, key, _ = secret_file(relay, container, env[f"AUDIOSOCKETS_STATUS_{option}"])
        assert key == SECRET_KEY_OF[option], (option, name, key)
        if option != "TLS_CA":
            assert "admin" in name, f"status's {option} is {name}, not the admin identity's"
    # Variables that are no option of `status` would be silently ignored by click.
    status = cli_main.commands["status"]
    known = {p.envvar for p in status.params if isinstance(p, click.Option)}
    ours = {k for k in env if k.startswith("AUDIOSOCKETS_STATUS_")}
    assert ours <= known, sorted(ours - known)


def test_secure_overlay_documents_every_secret_it_mounts() -> None:
    docs = render(SECURE)
    used = set()
    for workload in workloads(docs):
        for volume in pod_spec(workload).get("volumes", []):
            for source in volume.get("projected", {}).get("sources", []):
                if "secret" in source:
                    used.add(
                        (
                            source["secret"]["name"],
                            tuple(i["key"] for i in source["secret"]["items"]),
                        )
                    )
    text = (SECURE / "kustomization.yaml").read_text()
    created = {}
    for name, rest in re.findall(r"kubectl -n audiosockets create secret \w+ (\S+) (.*)", text):
        keys = re.findall(r"--from-file=([\w.-]+)=", rest)
        if "--cert=" in rest:
            keys += ["tls.crt", "tls.key"]
        created[name] = set(keys)
    for name, keys in used:
        assert name in created, f"Secret {name} is mounted but not created in the comment"
        assert set(keys) <= created[name], (name, keys, created[name])
    assert set(created) == {name for name, _ in used}, "a documented Secret is never mounted"


# --- NATS (overlays/fleet) ------------------------------------------------------


def nats_overlays() -> list[Path]:
    return [p for p in OVERLAYS if of_kind(render(p), "StatefulSet")]


def test_fleet_is_a_nats_overlay() -> None:
    assert "fleet" in {p.name for p in nats_overlays()}


@pytest.mark.parametrize("directory", nats_overlays(), ids=lambda p: p.name)
def test_nats_cluster_keeps_three_replicas_and_clients_reach_every_server(
    directory: Path,
) -> None:
    docs = render(directory)
    (nats,) = of_kind(docs, "StatefulSet")
    assert nats["spec"]["replicas"] == 3
    assert nats["spec"]["podManagementPolicy"] == "Parallel"
    (claim,) = nats["spec"]["volumeClaimTemplates"]
    (container,) = [c for c in pod_spec(nats)["containers"] if c["name"] == "nats"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config = find(docs, "ConfigMap", "nats-config")["data"]["nats.conf"]
    # JetStream keeps its store on the claimed volume, not in the container.
    assert re.search(rf"store_dir:\s*{mounts[claim['metadata']['name']]}\b", config)
    service = find(docs, "Service", nats["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert selects(service["spec"]["selector"], nats["spec"]["template"]["metadata"]["labels"])
    pods = {f"{nats['metadata']['name']}-{i}.{service['metadata']['name']}" for i in range(3)}
    routes = set(re.findall(r"nats://([\w.-]+):6222", config))
    assert routes == pods, routes
    assert container_port(container, "client") == 4222
    # Prometheus finds the servers like every other pod: annotated, a port named metrics.
    (exporter,) = [c for c in pod_spec(nats)["containers"] if c["name"] == "exporter"]
    annotations = nats["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == container_port(exporter, "metrics")
    assert "http://localhost:8222" in exporter["args"]
    assert container_port(container, "monitor") == 8222
    clients = 0
    for workload, c in containers(docs):
        url = resolve_env(docs, c)[f"AUDIOSOCKETS_{command_of(c).upper()}_RELAY"]
        assert is_nats_url(url), f"{ident(workload)}: {url}"
        address = parse_nats_url(url)
        assert {s.split("//")[1].rsplit(":", 1)[0] for s in address.servers} == pods
        assert {int(s.rsplit(":", 1)[1]) for s in address.servers} == {4222}
        assert dict(address.options).get("replicas") == "3", url
        clients += 1
    assert clients >= 4  # a recorder and the three processors
