"""The `htupload` job: build and upload the shards of a dataset in parallel on Dask.

The plan (which files make which sample, which samples go to which shard) is made on the driver
by :mod:`tarproc.uploadplan`; each shard is then one task that reads its sources, writes the tar and
commits it atomically, so a reader never sees a partial shard and retries or speculative copies
are harmless. A rerun skips shards that already exist (after a crash, or after fixing unreadable
files), and the manifest still lists every shard: entries of skipped shards come from the
previous manifest when the shard's size still matches, otherwise the shard is read back. The temp
files that stopped writes of the shards and the manifest leave (``.NAME.tmp-XXXX``, local ones)
are removed before the first task and after the last, however the job ends.

Unreadable files (missing, a dangling symlink, a directory, an http 404, ...): by default the
shard that contains one is not written and counts as failed; every bad file of it is listed in
`result.unreadable` (key, field, source, error, shard), the other shards are written, and the
result is not ok. Fix the files and run again: only the missing shards are built. (Such a shard
is not retried: a missing file does not come back by itself, and the storage layer already
retries transient network errors; any other error in a task is retried as usual.) With
`skip_unreadable=True` the samples with unreadable files are left out, their shards are
committed, and each left-out file is listed in `result.unreadable` and in the shard's manifest
entry; the result is still not ok, so the loss is never silent.

    from tarproc.jobs.upload_job import upload
    result = upload(["images/"], "out/ds-%06d.tar", maxcount=1000, maxsize="1GB",
                    shuffle=True, seed=1, manifest="out/manifest.json")
    print(result.summary())
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field

from tarproc import storage, uploadplan as plan
from tarproc.errors import TarprocError
from tarproc.storage.local import remove_temp_files
from tarproc.tarutils import parse_size, write_manifest

__all__ = ["UploadResult", "upload", "plan_upload"]


@dataclass
class UploadResult:
    """What an upload did: the job's result, the manifest, and every problem found."""

    output: str
    seed: int | None = None
    job: object = None                      # the JobResult of the build job
    shards: list = field(default_factory=list)       # manifest entries, in shard order
    failed: list = field(default_factory=list)       # (url, one-line error)
    unreadable: list = field(default_factory=list)   # dicts: key, field, source, error, shard
    skipped_unreadable: bool = False                  # were those samples left out (or shards)?
    manifest: dict | None = None
    written: int = 0                                  # shards built by this run

    @property
    def ok(self) -> bool:
        """True when every shard was written and no file was left out."""
        return not self.failed and not self.unreadable

    @property
    def samples(self) -> int:
        return sum(e["count"] for e in self.shards)

    @property
    def nbytes(self) -> int:
        return sum(e["bytes"] for e in self.shards)

    def summary(self) -> str:
        """One line: shards written/skipped/failed, the dataset's samples and bytes, time."""
        from tarproc.tarutils import format_size

        job = self.job
        failed = len({u for u, _ in self.failed})
        line = (f"{job.total if job else len(self.shards)} shards: {self.written} written, "
                f"{job.skipped if job else 0} skipped (existing), {failed} failed; dataset: "
                f"{len(self.shards)} shards, {self.samples} samples, {format_size(self.nbytes)}")
        if self.unreadable:
            what = "left out" if self.skipped_unreadable else "in unwritten shards"
            line += f"; {len(self.unreadable)} unreadable file(s) {what}"
        if job is not None:
            line += f" in {job.seconds:.1f} s"
        return line


def _absolute(url):
    """Local paths made absolute: workers of a cluster do not share the driver's directory."""
    if url.startswith("text:") or not storage.is_local(url) or url.startswith("file:"):
        return url
    return os.path.abspath(url)


def _for_workers(shard):
    """The shard as a task gets it: every local path absolute."""
    samples = [plan.Sample(s.key, tuple((ext, _absolute(src)) for ext, src in s.fields))
               for s in shard.samples]
    return plan.Shard(_absolute(shard.url), shard.index, samples)


def _exists(shard):
    return storage.committed(shard.url)


def _load_previous(manifest_url):
    """{url: entry} of an earlier run's manifest, or {} when there is none or it is unreadable."""
    if not manifest_url:
        return {}
    try:
        if not storage.exists(manifest_url):
            return {}
        with storage.open_read(manifest_url) as stream:
            data = json.loads(stream.read().decode("utf-8"))
        return {e["url"]: e for e in data.get("shards", []) if isinstance(e, dict) and "url" in e}
    except Exception:  # noqa: BLE001 - a damaged manifest is simply rebuilt
        return {}


def plan_upload(sources, output, *, files=None, root=None, maxcount=None, maxsize=None,
                shuffle=False, seed=None):
    """(shards, seed): the shard plan of an upload, made on the driver without Dask.

    `sources` is a directory, plan file or URL, a list of them, or a list of
    :class:`tarproc.uploadplan.Sample`. With `shuffle` and no `seed`, a random seed is drawn and
    returned, so the order can be reproduced.
    """
    if isinstance(sources, str):
        sources = [sources]
    sources = list(sources or [])
    if sources and all(isinstance(s, plan.Sample) for s in sources):
        samples = sources
        if files is not None:
            samples = samples + plan.plan_files(plan.read_lines(files), root=root)
    else:
        samples = plan.plan_sources(sources, files=files, root=root)
    if not samples:
        raise plan.PlanError("the sources hold no files")
    if shuffle:
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "big")
        samples = plan.shuffle_samples(samples, seed)
    if maxsize is not None:
        maxsize = parse_size(maxsize)
    return plan.deal(samples, output, maxcount=maxcount, maxsize=maxsize), seed


def upload(sources, output, *, files=None, root=None, maxcount=None, maxsize=None, shuffle=False,
           seed=None, manifest=None, skip_unreadable=False, compression="auto", cluster=None,
           workers=None, retries=2, force=False, speculation=True, progress=True, log_dir=None,
           on_result=None) -> UploadResult:
    """Upload files as a sharded tar dataset at `output` (`@N`, `%06d` or one name).

    Sources and sharding are described in :mod:`tarproc.uploadplan`; `cluster`/`workers` choose where
    the shards are built (see :mod:`tarproc.jobs.cluster`); `force` rebuilds existing shards;
    `manifest` (a path or URL) receives a JSON list of the shards with count, bytes and sha256.
    Raises for a bad plan before anything is written; problems while building are in the result.
    """
    from tarproc.jobs.cluster import Cluster
    from tarproc.jobs.driver import run_items

    shards, seed_used = plan_upload(sources, output, files=files, root=root, maxcount=maxcount,
                                    maxsize=maxsize, shuffle=shuffle, seed=seed)
    # temp files of our shards and manifest that an interrupted or killed run left go first,
    # and those of this run (stopped workers, cancelled tasks) at the end, however the job ends
    targets = [s.url for s in shards] + ([manifest] if manifest else [])
    remove_temp_files(targets)
    try:
        if shuffle and seed is None and not force:
            present = [s.url for s in shards if storage.exists(s.url)]
            if present:
                raise TarprocError(f"{storage.redact(present[0])} already exists: a shuffled "
                                   f"upload resumes only with the same --seed (or use --force "
                                   f"to rebuild)")
        previous = {} if force else _load_previous(manifest)
        result = UploadResult(output=output, seed=seed_used, skipped_unreadable=skip_unreadable)
        entries = {}
        planned = {s.url: len(s.samples) for s in shards}

        build = functools.partial(plan.build_shard_task, skip_unreadable=skip_unreadable,
                                  compression=compression)
        with Cluster(cluster, workers=workers, quiet=not progress) as held:
            keys = [storage.redact(s.url) for s in shards]
            job = run_items(build, [_for_workers(s) for s in shards], keys=keys, cluster=held,
                            retries=retries, is_done=_exists, force=force,
                            speculation=speculation, progress=progress, desc="shards",
                            log_dir=log_dir, on_result=on_result)
            result.job = job
            processed = set()
            for record in job.items:
                shard = shards[record["index"]]
                processed.add(shard.url)
                if record.get("unreadable"):
                    result.unreadable.extend(dict(p, shard=shard.url)
                                             for p in record["unreadable"])
                if record["status"] != "done":
                    result.failed.append((shard.url, record.get("error", "failed")))
                    continue
                if record.get("written") is False:
                    result.failed.append((shard.url, f"{len(record['unreadable'])} unreadable "
                                                     f"file(s), shard not written"))
                    continue
                result.written += 1
                entry = {"url": shard.url, **{k: record[k] for k in ("count", "bytes", "sha256")}}
                if record.get("unreadable"):
                    entry["unreadable"] = [{k: p[k] for k in ("key", "field", "source", "error")}
                                           for p in record["unreadable"]]
                entries[shard.url] = entry

            # shards skipped because they exist: reuse the old manifest entry if the size still
            # matches, else read the shard back (in parallel, on the same cluster)
            unknown = []
            for shard in shards:
                if shard.url in processed:
                    continue
                old = previous.get(shard.url)
                if old is not None and all(k in old for k in ("count", "bytes", "sha256")):
                    try:
                        same = storage.size(shard.url) == old["bytes"]
                    except Exception:  # noqa: BLE001
                        same = False
                    if same:
                        entries[shard.url] = dict(old)
                        continue
                unknown.append(shard.url)
            if unknown:
                described = run_items(plan.describe_shard, [_absolute(u) for u in unknown],
                                      keys=[storage.redact(u) for u in unknown], cluster=held,
                                      retries=retries, speculation=False, progress=progress,
                                      desc="existing shards")
                for record in described.items:
                    url = unknown[record["index"]]
                    if record["status"] == "done":
                        entries[url] = {"url": url,
                                        **{k: record[k] for k in ("count", "bytes", "sha256")}}
                    else:
                        result.failed.append(
                            (url, f"exists but cannot be read back: {record['error']}"))

        # an existing shard from a different plan would silently duplicate or lose samples
        for url, entry in entries.items():
            left_out = len({p["key"] for p in entry.get("unreadable", [])})
            if entry["count"] + left_out != planned[url]:
                result.failed.append((url, f"exists with {entry['count']} samples but the plan "
                                           f"puts {planned[url]} there (an earlier run with other "
                                           f"inputs or seed?); use --force to rebuild"))
        result.shards = [entries[s.url] for s in shards if s.url in entries]
        result.manifest = {
            "output": output,
            "shuffle": bool(shuffle), "seed": seed_used,
            "shards": result.shards,
            "samples": result.samples, "bytes": result.nbytes,
            "failed": [{"url": u, "error": e} for u, e in result.failed],
        }
        if manifest:
            write_manifest(manifest, result.manifest)
        return result
    finally:
        remove_temp_files(targets)  # (the cluster's workers, if local, are stopped by now)
