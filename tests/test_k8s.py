"""Kubernetes: the manifests in k8s/, the worker Dockerfile and the per-shard Jobs of `htk8s`.

Everything is checked offline. Core resources (Deployment, Service, Job) are validated against the
Kubernetes JSON schemas shipped by `kubernetes-validate`, in strict mode (unknown fields are
errors), for the oldest and the newest Kubernetes version we claim. The DaskCluster custom resource
has no core schema: its own fields are checked against the DaskCluster CRD of dask-kubernetes
(2026.3) and its embedded pod specs and service spec are validated as core Pods and a Service; if
dask-kubernetes happens to be installed its CRD schema is applied as well. The shell scripts of the
Jobs are run for real with bash (after the kubelet's `$(VAR)` expansion) with stand-ins for curl and
tarproc, fed hostile URLs and commands, to show nothing in them is ever executed.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

from tarproc import k8s  # noqa: E402
from tarproc.errors import PatternError, TarprocError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
PYTHON = sys.executable
# Oldest Kubernetes still commonly run, and the newest the installed schemas know.
K8S_VERSIONS = ["1.27", kubernetes_validate.utils.latest_version()]
CORE_MANIFESTS = ["dask-scheduler.yaml", "dask-workers.yaml", "job-template.yaml"]


def validate(resource):
    """Strict schema validation for every version in K8S_VERSIONS; raises on the first error."""
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(resource, version, strict=True)


def load_all(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]


# --- manifests --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CORE_MANIFESTS)
def test_core_manifests_validate_against_kubernetes_schemas(name):
    docs = load_all(K8S / name)
    assert docs
    for doc in docs:
        validate(doc)


def test_every_yaml_in_k8s_is_checked_by_some_test():
    assert sorted(p.name for p in K8S.glob("*.yaml")) == sorted(CORE_MANIFESTS + ["daskcluster.yaml"])


def test_validation_really_rejects_a_broken_manifest():
    doc = load_all(K8S / "dask-workers.yaml")[0]
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(doc)


def test_scheduler_service_exposes_comm_and_dashboard():
    docs = {d["kind"]: d for d in load_all(K8S / "dask-scheduler.yaml")}
    service, deployment = docs["Service"], docs["Deployment"]
    assert service["metadata"]["name"] == "dask-scheduler"
    assert {p["port"] for p in service["spec"]["ports"]} == {8786, 8787}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["dask", "scheduler"]


def test_workers_attach_to_the_service_with_one_thread_and_resources():
    deployment = load_all(K8S / "dask-workers.yaml")[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    assert args[args.index("--nthreads") + 1] == "1"
    assert "--memory-limit" in args
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert container["image"] == "tarproc-worker:latest"


# The fields of the DaskCluster CRD (kubernetes.dask.org/v1) in dask-kubernetes 2026.3.0.
DASKCLUSTER_FIELDS = {
    "spec": ({"idleTimeout", "scheduler", "worker"}, {"scheduler", "worker"}),
    "scheduler": ({"metadata", "service", "spec"}, {"spec", "service"}),
    "worker": ({"metadata", "replicas", "spec"}, {"spec"}),
}


def test_daskcluster_matches_the_crd_and_embeds_valid_pods_and_service():
    docs = load_all(K8S / "daskcluster.yaml")
    assert len(docs) == 1
    cluster = docs[0]
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    assert cluster["kind"] == "DaskCluster"
    assert set(cluster) <= {"apiVersion", "kind", "metadata", "spec"}
    assert k8s.is_dns_label(cluster["metadata"]["name"])
    spec = cluster["spec"]
    for part, node in (("spec", spec), ("scheduler", spec["scheduler"]), ("worker", spec["worker"])):
        allowed, required = DASKCLUSTER_FIELDS[part]
        assert set(node) <= allowed, f"{part}: unknown fields {set(node) - allowed}"
        assert required <= set(node), f"{part}: missing {required - set(node)}"
    assert isinstance(spec["worker"]["replicas"], int)
    # the embedded pod specs and service spec are core objects: validate them as such
    for role in ("scheduler", "worker"):
        validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"dask-{role}"},
                  "spec": spec[role]["spec"]})
    validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dask-scheduler"},
              "spec": spec["scheduler"]["service"]})
    # the operator names the Service <name>-scheduler: the same as the plain manifests
    assert f"{cluster['metadata']['name']}-scheduler" == "dask-scheduler"
    assert {p["port"] for p in spec["scheduler"]["service"]["ports"]} == {8786, 8787}
    assert spec["worker"]["spec"]["containers"][0]["args"][:2] == ["dask", "worker"]


def test_daskcluster_against_the_operator_crd_schema():
    """Validate against the DaskCluster CRD shipped by dask-kubernetes 2026.3.0 (copied into
    tests/data/k8s with its licence, so the test needs neither the package nor a cluster)."""
    import jsonschema

    crd = yaml.safe_load((Path(__file__).parent / "data" / "k8s" / "daskcluster-crd.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.Draft7Validator(schema).validate(load_all(K8S / "daskcluster.yaml")[0])
    broken = load_all(K8S / "daskcluster.yaml")[0]
    broken["spec"]["worker"]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(broken)


def test_job_template_file_is_the_built_in_default():
    assert (K8S / "job-template.yaml").read_text() == k8s.DEFAULT_TEMPLATE


# --- Dockerfile -------------------------------------------------------------------------------


def dockerfile_instructions(path):
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "dangling line continuation"
    return out


def test_dockerfile_lints():
    known = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
             "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
    steps = dockerfile_instructions(K8S / "Dockerfile")
    assert all(word in known for word, _ in steps), steps
    assert steps[0][0] == "FROM" and steps[0][1].startswith("python:3.11-slim")
    run_text = " ".join(args for word, args in steps if word == "RUN")
    for package in ("imagemagick", "graphicsmagick", "curl", "tini"):
        assert re.search(rf"\b{package}\b", run_text), package
    assert "rm -rf /var/lib/apt/lists" in run_text
    assert re.search(r"pip install \"?/src\[s3,gcs\]", run_text)
    # COPY sources exist in the build context (the repository root) and are not ignored
    ignored = [line.strip() for line in (K8S / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for word, args in steps:
        if word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            for source in parts[:-1]:
                assert (ROOT / source).exists(), f"COPY source {source} is not in the repository"
    for needed in ("setup.cfg", "pyproject.toml", "tarproc"):
        assert (ROOT / needed).exists() and needed not in ignored
    # JSON-form ENTRYPOINT with tini, and a numeric non-root USER that runAsNonRoot can verify
    entry = [args for word, args in steps if word == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[-1])[0] == "tini"
    user = [args for word, args in steps if word == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    for doc in load_all(K8S / "dask-workers.yaml"):
        assert doc["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)


# --- rendering Jobs ---------------------------------------------------------------------------

HOSTILE_COMMANDS = [
    "'; touch {m}/q1 #",
    "$(touch {m}/d1)",
    "`touch {m}/b1`",
    "echo ok\ntouch {m}/nl1",
    '"; touch {m}/dq1; echo "',
    "$$ $(HOME) $(KUBERNETES_SERVICE_HOST) ${{PATH}} \\ \\n",
    "-c x; touch {m}/opt1",
]
HOSTILE_URLS = [
    "http://h/a'; touch {m}/q2 #-@2.tar",
    "http://h/$(touch {m}/d2)-@2.tar",
    "http://h/`touch {m}/b2`-@2.tar",
    'http://h/a"; touch {m}/dq2; "-@2.tar',
    "http://h/a b&& touch {m}/amp2 | x > {m}/redir2-@2.tar",
    "http://h/$(KUBERNETES_SERVICE_HOST)$$-@2.tar",
]

FAKE_CURL = """#!/bin/bash
# stand-in for curl: log argv, serve or swallow the data
# (the two curls of a pipeline run at once: each logs to its own file)
if [ "$2" = "-T" ]; then printf '%s\\0' "$@" > "$LOG/upload.args"; cat > "$LOG/uploaded"; exit 0; fi
printf '%s\\0' "$@" > "$LOG/download.args"
[ -n "$FAIL_DOWNLOAD" ] && exit 22
printf 'SHARD-DATA'
"""
FAKE_TARPROC = """#!/bin/bash
# stand-in for tarproc: log argv, pass the stream through
printf '%s\\0' "$@" > "$LOG/tarproc.args"
cat
"""


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH dir with curl and tarproc stand-ins, and the folder they log to."""
    bindir, log = tmp_path / "bin", tmp_path / "log"
    bindir.mkdir()
    log.mkdir()
    for name, text in (("curl", FAKE_CURL), ("tarproc", FAKE_TARPROC)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    return bindir, log


def run_job_script(job, fake_bin, fail_download=False):
    """Run a Job's container command as the kubelet and then bash would."""
    bindir, log = fake_bin
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
    env["KUBERNETES_SERVICE_HOST"] = "10.0.0.1"  # service variables are expanded too
    argv = [k8s.k8s_expand(a, env) for a in container["command"]]
    assert argv[:2] == ["bash", "-c"]
    run_env = {"PATH": f"{bindir}:/usr/bin:/bin", "LOG": str(log), "HOME": str(log)}
    if fail_download:
        run_env["FAIL_DOWNLOAD"] = "1"
    return subprocess.run(["/bin/bash", "-c", argv[2]], env=run_env, cwd=log, capture_output=True,
                          text=True, timeout=10)


def logged_args(path):
    return Path(path).read_bytes().decode().split("\0")[:-1]


def test_rendered_jobs_validate_count_names_and_labels():
    jobs = k8s.render_jobs("http://data/in-{0000..0147}.tgz", "https://data/out-@0148.tar",
                           "gm convert sample.jpg sample.png; rm sample.jpg",
                           name="ImageNet_Convert", cpu="500m", memory="1Gi", backoff_limit=5)
    assert len(jobs) == 148
    names = [j["metadata"]["name"] for j in jobs]
    assert len(set(names)) == 148 and all(k8s.is_dns_label(n) for n in names)
    assert names[0] == "imagenet-convert-0000" and names[-1] == "imagenet-convert-0147"
    for job in jobs[:3] + jobs[-2:]:
        validate(job)
    job = jobs[7]
    assert job["spec"]["backoffLimit"] == 5
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}
    assert container["resources"]["limits"] == {"cpu": "500m", "memory": "1Gi"}
    assert job["metadata"]["annotations"]["tarproc/input"] == "http://data/in-0007.tgz"
    assert job["metadata"]["annotations"]["tarproc/output"] == "https://data/out-0007.tar"
    assert job["spec"]["template"]["metadata"]["labels"]["tarproc-shard"] == "0007"


def test_long_prefix_is_cut_to_a_valid_name():
    names = k8s.job_names("x" * 100 + "-" + "Y" * 10, 12000)
    assert all(k8s.is_dns_label(n) and len(n) <= 63 for n in names)
    assert len(set(names)) == 12000 and names[-1].endswith("-11999")
    with pytest.raises(TarprocError):
        k8s.job_names("___", 3)


def test_dumped_stream_round_trips_and_validates():
    jobs = k8s.render_jobs("http://d/in-@3.tgz", "http://d/out-@3.tar", "echo $x 'y'\nls")
    docs = load_all_text(k8s.dump_jobs(jobs))
    assert docs == jobs
    for doc in docs:
        validate(doc)


def load_all_text(text):
    return [d for d in yaml.safe_load_all(text) if d is not None]


@pytest.mark.parametrize("command", HOSTILE_COMMANDS)
def test_hostile_command_reaches_tarproc_verbatim_and_runs_nothing(command, fake_bin, tmp_path):
    command = command.format(m=tmp_path)
    jobs = k8s.render_jobs("http://h/in-@2.tgz", "http://h/out-@2.tar", command)
    validate(jobs[1])
    result = run_job_script(jobs[1], fake_bin)
    assert result.returncode == 0, result.stderr
    log = fake_bin[1]
    args = logged_args(log / "tarproc.args")
    assert args[-2:] == ["-o", "-"]
    flag = args[0]
    assert (flag == "-c" and args[1] == command) or flag == "-c" + command
    assert (log / "uploaded").read_text() == "SHARD-DATA"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "log"], "something was executed"


@pytest.mark.parametrize("pattern", HOSTILE_URLS)
def test_hostile_urls_reach_curl_verbatim_and_run_nothing(pattern, fake_bin, tmp_path):
    pattern = pattern.format(m=tmp_path)
    out_pattern = pattern.replace("-@2.tar", "-out-@2.tar")
    jobs = k8s.render_jobs(pattern, out_pattern, "true")
    validate(jobs[0])
    result = run_job_script(jobs[0], fake_bin)
    assert result.returncode == 0, result.stderr
    download = logged_args(fake_bin[1] / "download.args")
    upload = logged_args(fake_bin[1] / "upload.args")
    assert download == ["-fsS", pattern.replace("@2", "0")]
    assert upload == ["-fsS", "-T", "-", out_pattern.replace("@2", "0")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "log"], "something was executed"


def test_pipefail_makes_a_failed_download_fail_the_job(fake_bin):
    jobs = k8s.render_jobs("http://h/in-@1.tgz", "http://h/out-@1.tar", "true")
    assert run_job_script(jobs[0], fake_bin, fail_download=True).returncode != 0


@pytest.mark.parametrize("url", ["http://h/a\nb-@2.tar", "http://h/a\rb-@2.tar", "http://h/a\x00-@2.tar"])
def test_control_characters_in_urls_are_refused(url):
    with pytest.raises(TarprocError, match="control character"):
        k8s.render_jobs(url, "http://h/out-@2.tar", "true")
    with pytest.raises(TarprocError, match="control character"):
        k8s.render_jobs("http://h/in-@2.tar", url, "true")


@pytest.mark.parametrize("inputs,outputs,message", [
    ("http://h/in-@3.tgz", "http://h/out-@4.tar", "4 output shard"),
    ("s3://b/in-@2.tgz", "http://h/out-@2.tar", "curl"),
    ("in-@2.tgz", "http://h/out-@2.tar", "curl"),
    ("-o-@2.tgz", "http://h/out-@2.tar", "curl"),
    ("http://h/in-@2.tgz", "http://h/out.tar", "1 output shard"),
    ("http://h/in-{0..1}.tgz", "http://h/in-{0..1}.tgz", "both an input and an output"),
])
def test_bad_pattern_pairs_are_refused(inputs, outputs, message):
    with pytest.raises((TarprocError, PatternError), match=message):
        k8s.render_jobs(inputs, outputs, "true")


def test_bad_quantities_and_templates_are_refused(tmp_path):
    with pytest.raises(TarprocError, match="--cpu"):
        k8s.render_jobs("http://h/a-@1.tar", "http://h/b-@1.tar", "true", cpu="1 core")
    with pytest.raises(TarprocError, match="--memory"):
        k8s.render_jobs("http://h/a-@1.tar", "http://h/b-@1.tar", "true", memory="2GB; x")
    with pytest.raises(TarprocError, match="must be a Kubernetes Job"):
        k8s.render_jobs("http://h/a-@1.tar", "http://h/b-@1.tar", "true",
                        template="apiVersion: v1\nkind: Pod\n")
    with pytest.raises(TarprocError, match="--template"):
        k8s.render_jobs("http://h/a-@1.tar", "http://h/b-@1.tar", "true",
                        template_path=str(tmp_path / "missing.yaml"))


def test_custom_template_keeps_its_extra_fields(tmp_path):
    template = yaml.safe_load(k8s.DEFAULT_TEMPLATE)
    pod = template["spec"]["template"]["spec"]
    pod["nodeSelector"] = {"pool": "cpu"}
    pod["containers"][0]["envFrom"] = [{"secretRef": {"name": "s3-credentials"}}]
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(template))
    jobs = k8s.render_jobs("http://h/a-@2.tar", "http://h/b-@2.tar", "true", template_path=str(path),
                           image="registry.example/tarproc:1.2")
    for job in jobs:
        validate(job)
        spec = job["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {"pool": "cpu"}
        assert spec["containers"][0]["envFrom"][0]["secretRef"]["name"] == "s3-credentials"
        assert spec["containers"][0]["image"] == "registry.example/tarproc:1.2"
        assert spec["containers"][0]["resources"]["limits"]["memory"] == "2Gi"


def test_k8s_expand_follows_the_kubelet_rules():
    env = {"A": "x"}
    assert k8s.k8s_expand("$(A) $(B) $$(A) $$ $ $( $x", env) == "x $(B) $(A) $ $ $( $x"
    for text in ["$(A)$$(A)$$$", "a$b$(c", "$"]:
        assert k8s.k8s_expand(k8s.k8s_escape(text), env) == text


# --- the command ------------------------------------------------------------------------------


def htk8s(*args):
    return subprocess.run([PYTHON, "-m", "tarproc.cli.htk8s", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_htk8s_end_to_end(tmp_path):
    template = tmp_path / "job.yaml"
    template.write_text(k8s.DEFAULT_TEMPLATE)
    result = htk8s("-c", "convert sample.jpg sample.ppm; rm sample.jpg", "--name", "conv",
                   "--image", "tarproc-worker:v2", "--cpu", "2", "--memory", "3Gi",
                   "--backoff-limit", "1", "--template", str(template), "--procs", "2",
                   "http://data/imagenet_train-{0000..0009}.tgz", "http://data/ppm-{0000..0009}.tar")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("---\n")
    docs = load_all_text(result.stdout)
    assert [d["metadata"]["name"] for d in docs] == [f"conv-{i:04d}" for i in range(10)]
    for doc in docs:
        validate(doc)
        container = doc["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "tarproc-worker:v2"
        assert doc["spec"]["backoffLimit"] == 1
        assert " | tarproc -p 2 -c " in container["command"][2]


def test_htk8s_bad_pattern_pair_is_a_one_line_error():
    result = htk8s("-c", "true", "http://h/in-@3.tgz", "http://h/out-@4.tar")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("htk8s: error: ")


def test_htk8s_help():
    result = htk8s("--help")
    assert result.returncode == 0 and "usage: htk8s" in result.stdout


def test_big_output_is_written_whole_under_pythonunbuffered(tmp_path):
    """PYTHONUNBUFFERED=1 makes stdout a raw file whose writes may be partial into a full pipe;
    the text layer would drop the rest (a manifest cut short, exit 0 under `| head`)."""
    from cli_helpers import sh

    cmd = "htk8s -c true 'http://s/in-@300.tgz' 'http://s/out-@300.tar'"
    whole = sh(cmd, tmp_path, check=True).stdout
    assert len(whole) > 200_000
    slow = sh(f"{cmd} | (sleep 0.5; cat)", tmp_path, env={"PYTHONUNBUFFERED": "1"}, check=True)
    assert slow.stdout == whole
    cut = sh(f"{cmd} | head -1; exit ${{PIPESTATUS[0]}}", tmp_path, env={"PYTHONUNBUFFERED": "1"})
    assert cut.returncode == 141 and cut.stderr == b""


def test_a_name_that_is_not_a_dns_label_is_changed_with_a_warning(tmp_path):
    from cli_helpers import sh

    proc = sh("htk8s -c true --name Bad_Name 'http://s/i-@2' 'http://s/o-@2'", tmp_path, check=True)
    assert b"bad-name-0000" in proc.stdout and b"app.kubernetes.io/instance: bad-name" in proc.stdout
    assert proc.stderr.decode().startswith("htk8s: warning: --name 'Bad_Name' is not a DNS label: "
                                           "the jobs are named bad-name-NNNN")
    assert sh("htk8s -c true --name good 'http://s/i-@2' 'http://s/o-@2'", tmp_path, check=True).stderr == b""


@pytest.mark.parametrize("cmd", [
    "htk8s -c true --procs 0 http://s/i-@2 http://s/o-@2",
    "htk8s -c true --backoff-limit -1 http://s/i-@2 http://s/o-@2",
    "tarshow -n -1 x.tar", "tarcat --skip -1 x.tar -o y.tar", "tarsplit -o x-%d.tar --maxsize 1XB x.tar",
    "htshuffle --memory lots 'x-@2.tar' 'y-@2.tar'", "htupload --maxsize lots d 'y-@2.tar'",
    "htextract --count -1 -f a x.tar", "htmapper --retries -1 -C true 'x-@2.tar' 'y-@2.tar'",
])
def test_a_bad_option_value_is_a_usage_error_everywhere(tmp_path, cmd):
    from cli_helpers import sh

    proc = sh(cmd, tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "usage:" in err and f"{cmd.split()[0]}: error: argument" in err, err
