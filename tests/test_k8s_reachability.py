"""Who can reach whom: the NetworkPolicies of the rendered overlays, evaluated.

Each overlay (dev, prod, prod + retrain CronJob) is rendered with ``kubectl kustomize`` together with
k8s/pipeline-namespace (the policies of our pipeline pods in namespace kubeflow). Over a set of
concrete pods -- ours, from the rendered manifests, with their labels and namespace, plus the pods
a real cluster has around them (KFP's services, another user's KFP step, a foreign tenant's KFP step,
a pod forging our label in another namespace, an unlabelled pod in namespace rlhf, the ingress
controller, CoreDNS, the API server, the internet) -- :func:`allowed` applies the Kubernetes
NetworkPolicy semantics:

* a pod is isolated for ingress (egress) when some policy of its namespace selects it and has that
  policy type (``policyTypes`` absent: Ingress, plus Egress when the policy has egress rules);
* an isolated pod's traffic is allowed when ANY rule of ANY policy selecting it allows it (they add
  up); a connection needs the source's egress AND the destination's ingress;
* a peer: ``podSelector`` alone means pods of the policy's namespace, ``namespaceSelector`` alone all
  pods of the matching namespaces, both in one peer means both (AND), ``ipBlock`` a CIDR minus
  ``except``; an absent/empty ``from``/``to`` means everyone, absent/empty ``ports`` every port;
* ports: number or the name of a destination container port, protocol (default TCP), ``endPort``;
  selectors: ``matchLabels`` and ``matchExpressions`` (In, NotIn, Exists, DoesNotExist).

The whole matrix is compared with :data:`expected`; on a difference it is printed. docs/deploy.md
carries the same matrix as a table (checked too). On main before the default-deny/egress policies
this test fails: a foreign tenant's KFP pod reached MLflow and MinIO (v2_component label admitted
from any namespace), and every pod had unrestricted egress.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

import pytest
import yaml
from test_k8s import K8S, ROOT, builds, find, load_all, pod_specs  # noqa: F401 (builds: the fixture)

from rlhf.pipeline.dag import POD_LABEL

KFP_NAMESPACE = "kubeflow"
OURS = "rlhf"
INTERNET_IP = "203.0.113.7"
DOC = ROOT / "docs/deploy.md"
OVERLAYS = ("dev", "prod", "prod+cronjob")


# ---------------------------------------------------------------------------- the world


@dataclass
class Endpoint:
    name: str
    ip: str
    namespace: str | None = None  # None: outside the pod network (API server, internet)
    labels: dict[str, str] = field(default_factory=dict)
    ports: list[dict] = field(default_factory=list)  # container ports: name, containerPort, protocol


@dataclass(frozen=True)
class Target:
    name: str  # the matrix column
    pod: str
    port: int
    protocol: str = "TCP"


def match_labels(selector: dict | None, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector; an empty one matches everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        if op not in {"In", "NotIn", "Exists", "DoesNotExist"}:
            raise ValueError(f"unknown selector operator {op}")
    return True


def peer_matches(peer: dict, policy_ns: str, ep: Endpoint, namespaces: dict[str, dict]) -> bool:
    if "ipBlock" in peer:
        ip = ipaddress.ip_address(ep.ip)
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(x) for x in block.get("except", []))
    if ep.namespace is None:  # selectors only ever select pods
        return False
    if "namespaceSelector" in peer:
        if not match_labels(peer["namespaceSelector"], namespaces[ep.namespace]):
            return False
    elif ep.namespace != policy_ns:
        return False
    return "podSelector" not in peer or match_labels(peer["podSelector"], ep.labels)


def port_matches(rule_ports: list[dict] | None, target: Target, dst: Endpoint) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != target.protocol:
            continue
        port = p.get("port")
        if port is None:
            return True
        if isinstance(port, str):  # a named port of the destination pod
            if any(c.get("name") == port and c["containerPort"] == target.port
                   and c.get("protocol", "TCP") == target.protocol for c in dst.ports):
                return True
            continue
        if port <= target.port <= p.get("endPort", port):
            return True
    return False


def policy_types(spec: dict) -> list[str]:
    return spec.get("policyTypes") or ["Ingress"] + (["Egress"] if "egress" in spec else [])


def direction_allowed(policies: list[dict], subject: Endpoint, other: Endpoint, target: Target,
                      dst: Endpoint, kind: str, namespaces: dict[str, dict]) -> bool:
    """``kind`` "Ingress": may ``other`` reach ``subject``; "Egress": may ``subject`` reach ``other``."""
    if subject.namespace is None:
        return True  # not a pod: no NetworkPolicy applies to it
    selecting = [p for p in policies if p["metadata"]["namespace"] == subject.namespace
                 and match_labels(p["spec"]["podSelector"], subject.labels) and kind in policy_types(p["spec"])]
    if not selecting:
        return True  # not isolated in this direction
    key, peers_key = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    for p in selecting:
        for rule in p["spec"].get(key) or []:
            peers = rule.get(peers_key)
            if (not peers or any(peer_matches(x, p["metadata"]["namespace"], other, namespaces) for x in peers)) \
                    and port_matches(rule.get("ports"), target, dst):
                return True
    return False


def allowed(world: World, src: Endpoint, target: Target) -> bool:
    dst = world.endpoints[target.pod]
    return (direction_allowed(world.policies, src, dst, target, dst, "Egress", world.namespaces)
            and direction_allowed(world.policies, dst, src, target, dst, "Ingress", world.namespaces))


@dataclass
class World:
    namespaces: dict[str, dict[str, str]]
    endpoints: dict[str, Endpoint]
    policies: list[dict]
    targets: list[Target]

    def matrix(self) -> dict[str, set[str]]:
        """Source pod -> the targets it reaches (externals are targets only; no pod connects to itself)."""
        return {s.name: {t.name for t in self.targets if t.pod != s.name and allowed(self, s, t)}
                for s in self.endpoints.values() if s.namespace is not None}


def short_name(doc: dict, meta: dict) -> str:
    return {"rlhf-feedback": "feedback", "rlhf-retrain": "retrain", "rlhf-backup": "backup"}.get(
        meta.get("labels", {}).get("app.kubernetes.io/name", ""),
        meta.get("labels", {}).get("app.kubernetes.io/name") or f"{doc['kind']}/{doc['metadata']['name']}")


def world_for(docs: list[dict], pipeline_ns_docs: list[dict]) -> World:
    """Our pods from the rendered manifests, the Trainer job's node pods (k8s/jobs, created in rlhf by
    the launcher) and the pods a cluster has around them."""
    namespaces = {n: {"kubernetes.io/metadata.name": n}
                  for n in (OURS, KFP_NAMESPACE, "kube-system", "ingress-nginx", "team-b")}
    for d in docs:
        if d["kind"] == "Namespace":
            namespaces[d["metadata"]["name"]].update(d["metadata"].get("labels", {}))
    eps: list[Endpoint] = []
    for d in docs:
        if d["kind"] in {"TrainingRuntime", "TrainJob", "PyTorchJob"}:
            continue  # templates; their pods are the Trainer job's below
        for _, meta, pod in pod_specs(d):
            ports = [p for c in pod["containers"] for p in c.get("ports", [])]
            eps.append(Endpoint(short_name(d, meta), "", d["metadata"]["namespace"], dict(meta.get("labels", {})),
                                ports))
    (trainjob,) = load_all((K8S / "jobs/trainjob-ppo.yaml").read_text())
    (_, node_meta, _), = pod_specs(trainjob)
    for i in range(2):
        eps.append(Endpoint(f"trainer-node-{i}", "", OURS, dict(node_meta["labels"]),
                            [{"name": "rendezvous", "containerPort": 29500}]))
    ours = dict([POD_LABEL])
    kfp_step = {"pipelines.kubeflow.org/v2_component": "true", "pipeline/runid": "3f1c"}
    eps += [
        Endpoint("our-kfp-step", "", KFP_NAMESPACE, {**kfp_step, **ours}),
        Endpoint("kubeflow/other-pipeline-step", "", KFP_NAMESPACE, kfp_step),
        Endpoint("team-b/kfp-step", "", "team-b", kfp_step),
        Endpoint("team-b/forged-label", "", "team-b", {**kfp_step, **ours}),
        Endpoint("rlhf/unlabelled", "", OURS, {"run": "debug"}),
        Endpoint("ingress-nginx", "", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}),
        Endpoint("kfp-api", "", KFP_NAMESPACE, {"app": "ml-pipeline"},
                 [{"name": "http", "containerPort": 8888}, {"name": "grpc", "containerPort": 8887}]),
        Endpoint("kfp-mlmd", "", KFP_NAMESPACE, {"component": "metadata-grpc-server"},
                 [{"name": "grpc-api", "containerPort": 8080}]),
        Endpoint("kfp-minio", "", KFP_NAMESPACE, {"app": "minio"}, [{"name": "http", "containerPort": 9000}]),
        Endpoint("coredns", "", "kube-system", {"k8s-app": "kube-dns"},
                 [{"name": "dns", "containerPort": 53, "protocol": "UDP"},
                  {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}]),
    ]
    for i, ep in enumerate(eps):
        ep.ip = f"10.244.{i // 200}.{i % 200 + 10}"
    # the API server is where the pipeline namespace's policy says (its CIDR is set per cluster)
    api = [d for d in pipeline_ns_docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] ==
           "rlhf-pipeline-pods-kube-api"]
    api_ip = str(ipaddress.ip_network(api[0]["spec"]["egress"][0]["to"][0]["ipBlock"]["cidr"])[-1]) if api \
        else "192.0.2.1"
    assert api_ip != INTERNET_IP
    eps += [Endpoint("kube-api", api_ip), Endpoint("internet", INTERNET_IP)]
    endpoints = {}
    for ep in eps:
        assert ep.name not in endpoints, f"two pods named {ep.name}"
        endpoints[ep.name] = ep
    targets = [Target(f"{pod}:{port}" + ("/udp" if proto == "UDP" else ""), pod, port, proto)
               for pod, port, proto in [
                   ("mlflow", 5000, "TCP"), ("postgres", 5432, "TCP"), ("minio", 9000, "TCP"),
                   ("minio", 9001, "TCP"), ("feedback", 8008, "TCP"), ("trainer-node-1", 29500, "TCP"),
                   ("kfp-api", 8888, "TCP"), ("kfp-mlmd", 8080, "TCP"), ("kfp-minio", 9000, "TCP"),
                   ("coredns", 53, "UDP"), ("kube-api", 6443, "TCP"), ("internet", 443, "TCP")]
               if pod in endpoints]
    policies = [d for d in docs + pipeline_ns_docs if d["kind"] == "NetworkPolicy"]
    return World(namespaces, endpoints, policies, targets)


# ---------------------------------------------------------------------------- what must hold

DNS = "coredns:53/udp"
#: what a pod that no policy isolates reaches outside our namespace (KFP, DNS, API server, internet)
OPEN = {"kfp-api:8888", "kfp-mlmd:8080", "kfp-minio:9000", DNS, "kube-api:6443", "internet:443"}
FOREIGN = ("kubeflow/other-pipeline-step", "team-b/kfp-step", "team-b/forged-label", "kfp-api", "kfp-mlmd",
           "kfp-minio", "coredns")


def expected(world: World) -> dict[str, set[str]]:
    """The intended matrix: source -> the targets it reaches (everything else denied)."""
    want = {
        "mlflow": {"postgres:5432", "minio:9000", DNS},
        "postgres": {DNS},
        "minio": {DNS},
        "minio-buckets": {"minio:9000", DNS},
        "mlflow-accounts": {"mlflow:5000", DNS},
        "feedback": {DNS},
        "retrain": {"mlflow:5000", "kfp-api:8888", DNS},
        "backup": {"postgres:5432", "minio:9000", DNS},
        "trainer-node-0": {"mlflow:5000", "minio:9000", "trainer-node-1:29500", DNS},
        "trainer-node-1": {"mlflow:5000", "minio:9000", DNS},
        "our-kfp-step": {"mlflow:5000", "minio:9000", "kfp-api:8888", "kfp-mlmd:8080", "kfp-minio:9000", DNS,
                         "kube-api:6443"},
        "rlhf/unlabelled": {DNS},
        "ingress-nginx": OPEN | {"mlflow:5000", "feedback:8008"},
    } | {name: set(OPEN) for name in FOREIGN}
    columns = {t.name: t.pod for t in world.targets}
    want = {src: {t for t in reach if columns.get(t) not in (None, src)}
            for src, reach in want.items() if src in world.endpoints}
    missing = {n for n, ep in world.endpoints.items() if ep.namespace is not None} - set(want)
    assert not missing, f"pods without an expected row: {missing}"
    return want


def render(world: World, matrix: dict[str, set[str]], want: dict[str, set[str]] | None = None) -> str:
    """The matrix as a Markdown table (``x`` allowed; ``!`` where it differs from ``want``)."""
    cols = [t.name for t in world.targets]
    lines = ["| from \\ to | " + " | ".join(f"`{c}`" for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for src in matrix:
        cells = []
        for c in cols:
            cell = "x" if c in matrix[src] else ("" if c.split(":")[0] != src else "-")
            if want is not None and (c in matrix[src]) != (c in want.get(src, set())):
                cell = ("x" if c in matrix[src] else "") + "!"
            cells.append(cell)
        lines.append(f"| `{src}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def worlds(builds) -> dict[str, World]:  # noqa: F811 (the fixture imported from test_k8s)
    return {name: world_for(builds[name]["docs"], builds["pipeline-namespace"]["docs"]) for name in OVERLAYS}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_reachability_matrix(worlds, overlay):
    world = worlds[overlay]
    matrix = world.matrix()
    want = expected(world)
    table = render(world, matrix, want)
    # the headline properties first, for a readable failure
    assert "mlflow:5000" not in matrix["team-b/kfp-step"], f"a foreign tenant's KFP pod reaches MLflow\n{table}"
    assert "mlflow:5000" not in matrix["kubeflow/other-pipeline-step"], f"another pipeline reaches MLflow\n{table}"
    assert "mlflow:5000" not in matrix["team-b/forged-label"], f"our label from another namespace\n{table}"
    assert "minio:9000" not in matrix["team-b/kfp-step"], f"a foreign tenant's KFP pod reaches MinIO\n{table}"
    assert "mlflow:5000" in matrix["our-kfp-step"], f"our pipeline cannot reach MLflow\n{table}"
    assert {s for s, reach in matrix.items() if "postgres:5432" in reach} == {"mlflow", "backup"}, table
    diff = {s: (sorted(matrix[s] - want[s]), sorted(want[s] - matrix[s])) for s in want if matrix[s] != want[s]}
    assert not diff, f"{overlay}: (allowed but not expected, expected but denied) per source: {diff}\n{table}"


def test_deploy_doc_has_the_matrix(worlds):
    """docs/deploy.md shows the prod + CronJob matrix, as computed."""
    world = worlds["prod+cronjob"]
    text = DOC.read_text()
    block = re.search(r"<!-- reachability-matrix -->\n(.*?)\n<!-- /reachability-matrix -->", text, re.S)
    assert block, "docs/deploy.md: no <!-- reachability-matrix --> block"
    assert block.group(1).strip() == render(world, world.matrix()), \
        "docs/deploy.md matrix is stale; paste:\n" + render(world, world.matrix())


def test_policies_never_admit_by_kfp_label_alone(builds):  # noqa: F811
    """KFP's v2_component label is on every pipeline pod of every namespace: no peer may use it, and every
    peer from another namespace pins that namespace by name and the pods by label."""
    for name in (*OVERLAYS, "pipeline-namespace"):
        for pol in (d for d in builds[name]["docs"] if d["kind"] == "NetworkPolicy"):
            spec = pol["spec"]
            assert "pipelines.kubeflow.org/v2_component" not in yaml.safe_dump(spec), pol["metadata"]["name"]
            for rule in spec.get("ingress", []) + spec.get("egress", []):
                peers = rule.get("from", rule.get("to"))
                assert peers, f"{name}: {pol['metadata']['name']}: a rule open to everyone"
                for peer in peers:
                    if "namespaceSelector" in peer:
                        assert set(peer["namespaceSelector"]) == {"matchLabels"} and list(
                            peer["namespaceSelector"]["matchLabels"]) == ["kubernetes.io/metadata.name"], peer
                        assert peer.get("podSelector", {}).get("matchLabels"), f"{pol['metadata']['name']}: {peer}"
                    if "ipBlock" in peer:
                        assert ipaddress.ip_network(peer["ipBlock"]["cidr"]).num_addresses <= 256, peer


def test_default_deny_both_ways(builds):  # noqa: F811
    for name in OVERLAYS:
        spec = find(builds[name]["docs"], "NetworkPolicy", "default-deny")["spec"]
        assert spec == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


# ---------------------------------------------------------------------------- the evaluator itself


def tiny_world(policies: list[dict], pods: list[Endpoint], targets: list[Target]) -> World:
    ns = {n: {"kubernetes.io/metadata.name": n, **({"team": "a"} if n == "a" else {})} for n in ("a", "b")}
    for i, p in enumerate(pods):
        p.ip = p.ip or f"10.0.0.{i + 1}"
    for p in policies:
        p.setdefault("metadata", {}).setdefault("namespace", "a")
    return World(ns, {p.name: p for p in pods}, policies, targets)


def pol(spec: dict, ns: str = "a") -> dict:
    return {"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": ns}, "spec": spec}


def test_evaluator_semantics():
    server = Endpoint("server", "", "a", {"app": "srv"}, [{"name": "http", "containerPort": 8080}])
    same_ns = Endpoint("client-a", "", "a", {"role": "client"})
    other_ns = Endpoint("client-b", "", "b", {"role": "client"})
    plain_b = Endpoint("plain-b", "", "b", {})
    outside = Endpoint("outside", "192.168.1.5")
    t = Target("server:8080", "server", 8080)
    pods = [server, same_ns, other_ns, plain_b, outside]

    def reach(*policies: dict, target: Target = t) -> set[str]:
        w = tiny_world(list(policies), [Endpoint(p.name, p.ip, p.namespace, p.labels, p.ports) for p in pods],
                       [target])
        return {s.name for s in w.endpoints.values() if s.name != target.pod and allowed(w, s, target)}

    everyone = {"client-a", "client-b", "plain-b", "outside"}
    assert reach() == everyone, "no policy: not isolated"
    deny = pol({"podSelector": {"matchLabels": {"app": "srv"}}, "policyTypes": ["Ingress"]})
    assert reach(deny) == set()
    assert reach(pol({"podSelector": {}, "ingress": [{}]})) == everyone, "an empty rule allows all"
    by_pod = {"podSelector": {"matchLabels": {"role": "client"}}}
    assert reach(deny, pol({"podSelector": {}, "ingress": [{"from": [by_pod]}]})) == {"client-a"}, \
        "podSelector alone: the policy's namespace only"
    ns_b = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "b"}}}
    assert reach(pol({"podSelector": {}, "ingress": [{"from": [ns_b]}]})) == {"client-b", "plain-b"}
    assert reach(pol({"podSelector": {}, "ingress": [{"from": [{**ns_b, **by_pod}]}]})) == {"client-b"}, "AND"
    assert reach(pol({"podSelector": {}, "ingress": [{"from": [ns_b, by_pod]}]})) == {"client-a", "client-b",
                                                                                       "plain-b"}, "OR"
    expr = {"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]},
            "podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["client"]}]}}
    assert reach(pol({"podSelector": {}, "ingress": [{"from": [expr]}]})) == {"client-b"}
    notin = {"namespaceSelector": {}, "podSelector": {"matchExpressions": [
        {"key": "role", "operator": "NotIn", "values": ["client"]}]}}
    assert reach(pol({"podSelector": {}, "ingress": [{"from": [notin]}]})) == {"plain-b"}, "NotIn: key absent too"
    block = {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}
    assert reach(pol({"podSelector": {}, "ingress": [{"from": [block]}]})) == set()
    assert reach(pol({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "192.168.0.0/16"}}]}]})) \
        == {"outside"}
    named = [{"port": "http"}]
    assert reach(pol({"podSelector": {}, "ingress": [{"ports": named}]})) == everyone, "named port"
    assert reach(pol({"podSelector": {}, "ingress": [{"ports": [{"port": 8000, "endPort": 8100}]}]})) == everyone
    assert reach(pol({"podSelector": {}, "ingress": [{"ports": [{"port": 8080, "protocol": "UDP"}]}]})) == set()
    assert reach(pol({"podSelector": {}, "ingress": [{"ports": [{"port": 9090}]}]})) == set()
    assert reach(pol({"podSelector": {}, "ingress": [{}]}, ns="b")) == everyone, "another namespace's policy"
    # egress: isolating the client; a connection needs both sides
    egress_deny = pol({"podSelector": {"matchLabels": {"role": "client"}}, "policyTypes": ["Egress"]}, ns="b")
    assert reach(egress_deny) == {"client-a", "plain-b", "outside"}
    to_srv = pol({"podSelector": {}, "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {
        "matchLabels": {"app": "srv"}}}]}]}, ns="b")
    assert policy_types(to_srv["spec"]) == ["Ingress", "Egress"], "policyTypes absent: Ingress, + Egress"
    assert "client-b" in reach(egress_deny, to_srv)
    assert "client-b" not in reach(egress_deny, to_srv, deny)


def test_the_old_policies_fail_the_matrix(builds):  # noqa: F811
    """The check is not vacuous: main's policies before this change (kept below as text: KFP's v2_component
    label admitted from any namespace, an ingress-only default deny) fail it, for the reasons of the finding."""
    old = load_all(OLD_POLICIES)
    for d in old:
        d["metadata"]["namespace"] = OURS
    docs = [d for d in builds["prod"]["docs"] if d["kind"] != "NetworkPolicy"] + old
    world = world_for(docs, [])
    matrix = world.matrix()
    assert "mlflow:5000" in matrix["team-b/kfp-step"], "the old policies let a foreign KFP pod reach MLflow"
    assert "minio:9000" in matrix["team-b/kfp-step"]
    assert "internet:443" in matrix["mlflow"], "and nothing limited egress"
    assert matrix != expected(world)


OLD_POLICIES = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: mlflow-from-pipelines}
spec:
  podSelector: {matchLabels: {app.kubernetes.io/name: mlflow}}
  policyTypes: [Ingress]
  ingress:
    - from:
        - {namespaceSelector: {}, podSelector: {matchLabels: {rlhf.io/pipeline-pod: "true"}}}
        - {namespaceSelector: {}, podSelector: {matchLabels: {pipelines.kubeflow.org/v2_component: "true"}}}
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ingress-nginx}}
      ports: [{protocol: TCP, port: 5000}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: minio-from-clients}
spec:
  podSelector: {matchLabels: {app.kubernetes.io/name: minio}}
  policyTypes: [Ingress]
  ingress:
    - from:
        - podSelector: {matchLabels: {app.kubernetes.io/name: mlflow}}
        - podSelector: {matchLabels: {app.kubernetes.io/name: minio-buckets}}
        - {namespaceSelector: {}, podSelector: {matchLabels: {rlhf.io/pipeline-pod: "true"}}}
        - {namespaceSelector: {}, podSelector: {matchLabels: {pipelines.kubeflow.org/v2_component: "true"}}}
      ports: [{protocol: TCP, port: 9000}]
"""
