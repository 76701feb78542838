"""Kubernetes, pipeline style: one `batch/v1` Job per shard, rendered from a YAML template.

Each Job streams one shard through `tarproc` with no Dask and no shared filesystem:

    set -o pipefail
    curl -fsS IN | tarproc -c CMD -o - | curl -fsS -T - OUT

`render_jobs` returns the Jobs as dicts and `dump_jobs` turns them into a multi-document YAML
stream for `kubectl apply -f -` (the kubetpl way of working). The template is structured, not
text: it is loaded with pyyaml and htk8s sets the fields it owns (name, labels, image, command,
resources, backoffLimit), so a hostile URL or command can never change the shape of a manifest.
Everything else the user puts in a template (node selectors, tolerations, secrets with storage
credentials, a service account) is kept as written.

Two quoting layers stand between a user's string and the process it reaches, and both are
handled here: bash (every URL and the command go through `shlex.quote`) and Kubernetes itself,
which expands `$(VAR)` and turns `$$` into `$` in a container's command before bash sees it
(every `$` is therefore doubled; `k8s_expand` reproduces the kubelet's rule for the tests).
"""

import copy
import re
import shlex

import yaml

from . import shards
from .errors import TarprocError

DEFAULT_IMAGE = "tarproc-worker:latest"

# Kept identical to k8s/job-template.yaml (a test checks), so the command works when installed
# from a wheel, where the repository's k8s/ folder is not around.
DEFAULT_TEMPLATE = """\
# Template for the per-shard Jobs of `htk8s`. htk8s fills in metadata.name, the tarproc labels
# and annotations, the container's image, command and resources, and spec.backoffLimit; keep or
# add anything else (nodeSelector, tolerations, env from a Secret with storage credentials, ...).
apiVersion: batch/v1
kind: Job
metadata:
  name: tarproc-shard
  labels:
    app.kubernetes.io/name: tarproc
    app.kubernetes.io/component: shard-job
spec:
  backoffLimit: 3
  ttlSecondsAfterFinished: 86400
  template:
    metadata:
      labels:
        app.kubernetes.io/name: tarproc
        app.kubernetes.io/component: shard-job
    spec:
      restartPolicy: Never
      securityContext:
        runAsNonRoot: true
        runAsUser: 1000
        runAsGroup: 1000
      containers:
        - name: tarproc
          image: tarproc-worker:latest
          imagePullPolicy: IfNotPresent
          command: ["bash", "-c", "true"]
          env:
            - name: TMPDIR
              value: /scratch
          resources:
            requests:
              cpu: "1"
              memory: 2Gi
            limits:
              cpu: "1"
              memory: 2Gi
          securityContext:
            allowPrivilegeEscalation: false
          volumeMounts:
            - name: scratch
              mountPath: /scratch
      volumes:
        - name: scratch
          emptyDir: {}
"""

# Schemes curl can stream from and to; s3:// and gs:// are not among them.
CURL_SCHEMES = ("http", "https", "ftp", "ftps", "sftp", "scp", "file")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_NAME = 63


def is_dns_label(name):
    """Whether `name` is a valid RFC 1123 label (what Job names must be, to fit pod labels)."""
    return len(name) <= _MAX_NAME and bool(_DNS_LABEL.match(name))


def sanitize_prefix(prefix):
    """A job-name prefix made DNS-safe: lowercase, runs of other characters become one `-`."""
    clean = re.sub(r"[^a-z0-9]+", "-", prefix.lower()).strip("-")
    if not clean:
        raise TarprocError(f"--name {prefix!r}: needs at least one letter or digit")
    if clean != prefix:  # say so: `kubectl -l app.kubernetes.io/instance=NAME` needs the new one
        import warnings

        warnings.warn(f"--name {prefix!r} is not a DNS label: the jobs are named {clean}-NNNN "
                      f"(and labelled app.kubernetes.io/instance={clean})", stacklevel=2)
    return clean


def job_names(prefix, count):
    """`count` unique DNS-1123 Job names `PREFIX-0000`.., the prefix cut so each fits 63 chars."""
    prefix = sanitize_prefix(prefix)
    width = max(4, len(str(count - 1)))
    prefix = prefix[: _MAX_NAME - width - 1].rstrip("-") or "tarproc"
    return [f"{prefix}-{i:0{width}d}" for i in range(count)]


def check_url(url, role):
    """Refuse URLs curl cannot stream, and control characters (a newline could end a script line)."""
    if _CONTROL.search(url):
        raise TarprocError(f"{role} URL {url!r}: contains a newline or another control character")
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in CURL_SCHEMES:
        raise TarprocError(
            f"{role} URL {url!r}: a Job streams shards with curl, so it needs one of "
            f"{', '.join(s + '://' for s in CURL_SCHEMES)} (for s3:// or gs:// use htmapper on a Dask cluster)")
    return url


def check_quantity(value, option):
    """A Kubernetes resource quantity such as `500m`, `2`, `4Gi`; anything else is refused."""
    value = str(value)
    if not _QUANTITY.match(value):
        raise TarprocError(f"{option} {value!r}: not a Kubernetes quantity (e.g. 500m, 2, 512Mi, 4Gi)")
    return value


def shell_script(input_url, output_url, command, procs=None):
    """The bash script of one Job: stream IN through `tarproc -c CMD` to OUT, failing if any step fails."""
    if "\x00" in command:
        raise TarprocError("the tarproc command contains a NUL byte")
    # `-cVALUE` keeps a command that starts with `-` from being read as an option.
    cflag = f"-c{shlex.quote(command)}" if command.startswith("-") else f"-c {shlex.quote(command)}"
    parallel = f" -p {int(procs)}" if procs and int(procs) > 1 else ""
    return (
        "set -o pipefail\n"
        f"curl -fsS {shlex.quote(input_url)}"
        f" | tarproc{parallel} {cflag} -o -"
        f" | curl -fsS -T - {shlex.quote(output_url)}\n"
    )


def k8s_escape(text):
    """Protect a string from the kubelet's `$(VAR)` expansion: every `$` becomes `$$`."""
    return text.replace("$", "$$")


def k8s_expand(text, env):
    """What the kubelet does to a container's command and args, for checking `k8s_escape`.

    A port of Kubernetes' third_party/forked/golang/expansion: `$$` becomes `$`, `$(NAME)` becomes
    the value of NAME when it is defined and stays as written when not.
    """
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "$" and i + 1 < n:
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2:end]
                    out.append(env[name] if name in env else text[i:end + 1])
                    i = end + 1
                    continue
            out.append(c + nxt)
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def load_template(text=None, path=None):
    """The Job skeleton from a template file or text (default: the built-in one), checked."""
    if path is not None:
        try:
            with open(path, encoding="utf-8") as stream:
                text = stream.read()
        except OSError as exc:
            raise TarprocError(f"--template {path}: {exc.strerror or exc}") from exc
    if text is None:
        text = DEFAULT_TEMPLATE
    where = path or "the built-in template"
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise TarprocError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if len(docs) != 1:
        raise TarprocError(f"{where}: needs exactly one YAML document (a Job), found {len(docs)}")
    job = docs[0]
    if not isinstance(job, dict) or job.get("apiVersion") != "batch/v1" or job.get("kind") != "Job":
        raise TarprocError(f"{where}: must be a Kubernetes Job (apiVersion: batch/v1, kind: Job)")
    containers = (((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers")
    if not isinstance(containers, list) or not containers or not all(isinstance(c, dict) for c in containers):
        raise TarprocError(f"{where}: spec.template.spec.containers must list at least one container")
    return job


def _target_container(job):
    """The container htk8s fills: the one named `tarproc`, else the first."""
    containers = job["spec"]["template"]["spec"]["containers"]
    for container in containers:
        if container.get("name") == "tarproc":
            return container
    return containers[0]


def render_jobs(inputs, outputs, command, *, template=None, template_path=None, image=None,
                name="tarproc", cpu=None, memory=None, backoff_limit=None, procs=None):
    """One Job dict per shard pair of the `inputs` and `outputs` patterns (equal lengths).

    `image`, `cpu`, `memory` and `backoff_limit` override the template when given; otherwise the
    template's values stay.
    """
    if not command or not command.strip():
        raise TarprocError("-c: the tarproc command is empty")
    in_urls = shards.expand(inputs)
    out_urls = shards.expand_outputs(outputs, count=len(in_urls))
    for url in in_urls:
        check_url(url, "input")
    for url in out_urls:
        check_url(url, "output")
    if len(set(out_urls)) != len(out_urls):
        raise TarprocError(f"{outputs}: names the same output shard more than once")
    clash = set(in_urls) & set(out_urls)
    if clash:
        raise TarprocError(f"{sorted(clash)[0]}: is both an input and an output shard")
    if cpu is not None:
        cpu = check_quantity(cpu, "--cpu")
    if memory is not None:
        memory = check_quantity(memory, "--memory")
    if backoff_limit is not None and int(backoff_limit) < 0:
        raise TarprocError(f"--backoff-limit {backoff_limit}: must be 0 or more")
    if procs is not None and int(procs) < 1:
        raise TarprocError(f"--procs {procs}: must be 1 or more")
    if image is not None and (not image.strip() or _CONTROL.search(image) or " " in image):
        raise TarprocError(f"--image {image!r}: not an image reference")

    skeleton = load_template(text=template, path=template_path)
    prefix = sanitize_prefix(name)
    names = job_names(prefix, len(in_urls))
    instance = names[0].rsplit("-", 1)[0]
    jobs = []
    for index, (job_name, src, dst) in enumerate(zip(names, in_urls, out_urls)):
        job = copy.deepcopy(skeleton)
        shard = job_name.rsplit("-", 1)[1]
        labels = {"app.kubernetes.io/name": "tarproc", "app.kubernetes.io/instance": instance,
                  "tarproc-shard": shard}
        meta = job.setdefault("metadata", {})
        meta.pop("generateName", None)
        meta["name"] = job_name
        meta.setdefault("labels", {}).update(labels)
        meta.setdefault("annotations", {}).update({"tarproc/input": src, "tarproc/output": dst,
                                                   "tarproc/command": command})
        spec = job["spec"]
        if backoff_limit is not None:
            spec["backoffLimit"] = int(backoff_limit)
        pod_meta = spec["template"].setdefault("metadata", {}) or {}
        spec["template"]["metadata"] = pod_meta
        pod_meta.setdefault("labels", {}).update(labels)
        spec["template"]["spec"].setdefault("restartPolicy", "Never")
        container = _target_container(job)
        if image is not None:
            container["image"] = image
        container.setdefault("image", DEFAULT_IMAGE)
        container.pop("args", None)
        container["command"] = ["bash", "-c", k8s_escape(shell_script(src, dst, command, procs))]
        resources = container.setdefault("resources", {})
        for kind in ("requests", "limits"):
            if cpu is not None:
                resources.setdefault(kind, {})["cpu"] = cpu
            if memory is not None:
                resources.setdefault(kind, {})["memory"] = memory
        jobs.append(job)
    return jobs


class _Dumper(yaml.SafeDumper):
    """Safe YAML with multi-line strings (the scripts) as readable `|` blocks."""


def _str(dumper, value):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_jobs(jobs):
    """A multi-document YAML stream of the Jobs, for `kubectl apply -f -`."""
    return yaml.dump_all(jobs, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         allow_unicode=True, explicit_start=True)
