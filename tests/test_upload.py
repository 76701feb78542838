"""htupload: the seed commands end to end (subprocess, real JPEGs, real nginx and moto S3, a real
Dask cluster), read back with tarproc and with webdataset; planning and dealing as plain functions."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tarproc import datagen, streams
from tarproc import uploadplan as upload
from tarproc.errors import TarprocError

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable
N = 24  # samples in the image tree


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """images/<synset>/<name>.jpg + .cls for N samples (real JPEGs), some with a .seg.png too."""
    root = tmp_path_factory.mktemp("tree") / "images"
    jpgs = datagen.make_images(N, width=96, height=96, seed=5)
    files = {}
    for i, jpg in enumerate(jpgs):
        synset = datagen.SYNSETS[i % 3]
        d = root / synset
        d.mkdir(parents=True, exist_ok=True)
        key = f"{synset}/{synset}_{i:05d}"
        files[(key, "jpg")] = jpg
        files[(key, "cls")] = str(i % 3).encode()
        if i % 4 == 0:
            files[(key, "seg.png")] = f"mask {i}".encode()
    for (key, ext), data in files.items():
        (root / f"{key}.{ext}").write_bytes(data)
    (root / ".DS_Store").write_bytes(b"hidden files are not samples")
    return root, files


def htupload(*args, cwd, input=None, check=True, shell=False):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if shell:
        cmd = args[0].replace("htupload", f"{PYTHON} -m tarproc.cli.htupload")
    else:
        cmd = [PYTHON, "-m", "tarproc.cli.htupload", *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, input=input, capture_output=True, env=env, timeout=120,
                          shell=shell)
    if check and proc.returncode != 0:
        raise AssertionError(f"htupload {args} exited {proc.returncode}:\n{proc.stderr.decode()}")
    return proc


def fields_of(urls):
    """{(key, ext): bytes} of shards read back with tarproc, checking nothing appears twice."""
    out = {}
    for sample in streams.iter_samples(urls):
        for ext, value in sample.items():
            if not ext.startswith("__"):
                assert (sample["__key__"], ext) not in out, f"{sample['__key__']}.{ext} twice"
                out[(sample["__key__"], ext)] = value
    return out


def wds_fields(urls):
    import webdataset as wds

    out = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        for ext, value in sample.items():
            if not ext.startswith("__"):
                out[(sample["__key__"], ext)] = value
    return out


def counts(urls):
    return [sum(1 for _ in streams.iter_samples(u)) for u in urls]


# ------------------------------------------------------------------------------------------
# the seed commands


def test_seed_directory_to_http_at16(images, nginx_server, dask_cluster, tmp_path):
    root, files = images
    shutil.copytree(root, tmp_path / "images")
    base = f"{nginx_server.url}/seed1"
    proc = htupload("images/", f"{base}/dataset-@16.tar", "-c", dask_cluster.address,
                    "--manifest", "m.json", cwd=tmp_path)
    assert "16 shards: 16 written" in proc.stderr.decode()
    urls = [f"{base}/dataset-{i:02d}.tar" for i in range(16)]
    assert counts(urls) == [2] * 8 + [1] * 8            # 24 samples dealt evenly
    assert fields_of(urls) == files                     # every file exactly once, hidden left out
    assert wds_fields(urls) == files
    # shards in order give the samples in key order
    keys = [s["__key__"] for s in streams.iter_samples(urls)]
    assert keys == sorted({k for k, _ in files})


def test_seed_printf_shuffle(images, dask_cluster, tmp_path):
    root, files = images
    shutil.copytree(root, tmp_path / "images")
    htupload("images/", "out/dataset-%06d.tar", "--maxcount", "1000", "--maxsize", "1GB",
             "--shuffle", "--seed", "1", "-c", dask_cluster.address, cwd=tmp_path)
    assert sorted(os.listdir(tmp_path / "out")) == ["dataset-000000.tar"]
    got = list(streams.iter_samples(str(tmp_path / "out/dataset-000000.tar")))
    assert {(s["__key__"], e): v for s in got for e, v in s.items() if not e.startswith("__")} == files
    keys = [s["__key__"] for s in got]
    assert keys != sorted(keys)                          # shuffled
    assert keys == [s.key for s in upload.shuffle_samples(upload.plan_directory(str(root)), 1)]


def test_printf_limits_and_determinism(images, dask_cluster, tmp_path):
    from tarproc.jobs.upload_job import upload as do_upload

    root, files = images
    outs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        result = do_upload(str(root), str(tmp_path / name / "ds-%03d.tar"), maxcount=5,
                           shuffle=True, seed=seed, cluster=dask_cluster.address, progress=False)
        assert result.ok
        outs[name] = sorted((tmp_path / name).iterdir())
    assert [p.name for p in outs["a"]] == [f"ds-{i:03d}.tar" for i in range(5)]
    assert counts([str(p) for p in outs["a"]]) == [5, 5, 5, 5, 4]
    assert fields_of([str(p) for p in outs["a"]]) == files
    # same seed: byte-identical shards; another seed: another order
    assert [p.read_bytes() for p in outs["a"]] == [p.read_bytes() for p in outs["b"]]
    assert [p.read_bytes() for p in outs["a"]] != [p.read_bytes() for p in outs["c"]]

    # --maxsize: no shard exceeds it (each holds more than one sample here)
    assert do_upload(str(root), str(tmp_path / "sized/ds-%04d.tar"), maxsize="40kB",
                     cluster=dask_cluster.address, progress=False).ok
    parts = sorted((tmp_path / "sized").iterdir())
    assert len(parts) > 2
    assert all(p.stat().st_size <= 40_000 for p in parts)
    assert all(n >= 2 for n in counts([str(p) for p in parts]))
    assert fields_of([str(p) for p in parts]) == files
    # and the shards are as full as the limit allows
    sizes = upload.sample_sizes(upload.plan_directory(str(root)))
    first = counts([str(parts[0])])[0]
    assert sum(sizes[:first + 1]) + upload.TAR_TRAILER > 40_000


def test_seed_plan_to_s3(images, nginx_server, s3_server, tmp_path):
    root, files = images
    (nginx_server.root / "plan-src").mkdir(exist_ok=True)
    (nginx_server.root / "plan-src" / "remote.jpg").write_bytes(files[(f"{datagen.SYNSETS[0]}/"
                                                                      f"{datagen.SYNSETS[0]}_00000", "jpg")])
    lines = ["# a plan: KEY.EXT<TAB>SOURCE", ""]
    expected = {}
    for i, ((key, ext), data) in enumerate(sorted(files.items())):
        if ext == "jpg":
            lines.append(f"s{i:03d}.jpg\t{root / (key + '.jpg')}")
            lines.append(f"s{i:03d}.txt\ttext:label of {key}\twith a tab")
            expected[(f"s{i:03d}", "jpg")] = data
            expected[(f"s{i:03d}", "txt")] = f"label of {key}\twith a tab".encode()
    lines.append(f"web.jpg\t{nginx_server.url}/plan-src/remote.jpg")
    expected[("web", "jpg")] = (nginx_server.root / "plan-src" / "remote.jpg").read_bytes()
    (tmp_path / "plan.tsv").write_text("\n".join(lines) + "\n")
    bucket = s3_server.bucket
    # verbatim, so on a local cluster (whose workers inherit the moto fixture's AWS settings)
    htupload("plan.tsv", f"s3://{bucket}/ds-@8.tar", cwd=tmp_path)
    urls = [f"s3://{bucket}/ds-{i}.tar" for i in range(8)]
    assert counts(urls) == [4, 3, 3, 3, 3, 3, 3, 3]       # 25 samples over 8 shards
    assert fields_of(urls) == expected
    # the plan's order is kept
    plan_keys = list(dict.fromkeys(line.split("\t")[0].split(".")[0] for line in lines[2:]))
    assert [s["__key__"] for s in streams.iter_samples(urls)] == plan_keys


def test_seed_files_from_stdin(images, dask_cluster, tmp_path):
    root, files = images
    shutil.copytree(root, tmp_path / "images")
    htupload(f"find images -name '*.jpg' | htupload --files - 'out/ds-@4.tar' -c {dask_cluster.address}",
             cwd=tmp_path, shell=True)
    urls = [str(tmp_path / f"out/ds-{i}.tar") for i in range(4)]
    assert counts(urls) == [6, 6, 6, 6]
    expected = {k: v for k, v in files.items() if k[1] == "jpg"}
    assert fields_of(urls) == expected                   # same keys as the directory gives
    assert wds_fields(urls) == expected


def test_manifest_and_resume(images, dask_cluster, tmp_path):
    root, files = images
    args = [root, "out/ds-@6.tar.gz", "-c", dask_cluster.address, "--manifest", "m.json"]
    htupload(*args, cwd=tmp_path)
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert [e["url"] for e in manifest["shards"]] == [f"out/ds-{i}.tar.gz" for i in range(6)]
    assert manifest["samples"] == N

    def check(manifest):
        for entry in manifest["shards"]:
            data = (tmp_path / entry["url"]).read_bytes()
            assert data[:2] == b"\x1f\x8b"
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()
            assert entry["bytes"] == len(data)
            assert entry["count"] == 4
    check(manifest)
    # a crash lost two shards: the rerun builds only those, and the manifest is complete again
    (tmp_path / "out/ds-1.tar.gz").unlink()
    (tmp_path / "out/ds-4.tar.gz").unlink()
    before = (tmp_path / "out/ds-0.tar.gz").stat().st_mtime_ns
    proc = htupload(*args, cwd=tmp_path)
    assert "6 shards: 2 written, 4 skipped (existing), 0 failed" in proc.stderr.decode()
    assert (tmp_path / "out/ds-0.tar.gz").stat().st_mtime_ns == before
    again = json.loads((tmp_path / "m.json").read_text())
    assert again["shards"] == manifest["shards"]
    check(again)
    # without the old manifest, existing shards are read back for their entries
    (tmp_path / "m.json").unlink()
    proc = htupload(*args, cwd=tmp_path)
    assert "0 written, 6 skipped" in proc.stderr.decode()
    assert json.loads((tmp_path / "m.json").read_text())["shards"] == manifest["shards"]
    assert fields_of([str(tmp_path / e["url"]) for e in manifest["shards"]]) == files


def test_unreadable_files_fail_their_shard(images, nginx_server, dask_cluster, tmp_path):
    root, files = images
    tree = tmp_path / "images"
    shutil.copytree(root, tree)
    (tree / "zz").mkdir()
    os.symlink(tmp_path / "nowhere.jpg", tree / "zz" / "dangling.jpg")    # a dangling symlink
    proc = htupload(tree, "out/ds-@5.tar", "-c", dask_cluster.address, "--retries", "0",
                    "--manifest", "m.json", cwd=tmp_path, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert "zz/dangling.jpg" in err and "1 failed" in err
    # the last shard holds the bad sample and was not written; the others were
    assert sorted(os.listdir(tmp_path / "out")) == [f"ds-{i}.tar" for i in range(4)]
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert len(manifest["shards"]) == 4 and manifest["failed"][0]["url"] == "out/ds-4.tar"

    # a plan naming a missing path, a directory and an http 404: all named, in one run
    (tmp_path / "plan.tsv").write_text(
        f"a.jpg\t{tree}/{datagen.SYNSETS[0]}/{datagen.SYNSETS[0]}_00000.jpg\n"
        f"b.jpg\t{tmp_path}/missing.jpg\n"
        f"c.jpg\t{tree}\n"
        f"d.jpg\t{nginx_server.url}/no/such/file.jpg\n")
    proc = htupload("plan.tsv", "bad/one.tar", "-c", dask_cluster.address, "--retries", "0",
                    cwd=tmp_path, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert "3 unreadable file(s)" in err
    for name in ("missing.jpg", "b.jpg", "c.jpg", "d.jpg", "404"):
        assert name in err, name
    assert not (tmp_path / "bad").exists() or not os.listdir(tmp_path / "bad")


def test_skip_unreadable_reports_each_sample(images, dask_cluster, tmp_path):
    root, files = images
    tree = tmp_path / "images"
    shutil.copytree(root, tree)
    os.symlink(tmp_path / "nowhere", tree / datagen.SYNSETS[1] / "broken.jpg")
    proc = htupload(tree, "out/ds-@3.tar", "-c", dask_cluster.address, "--skip-unreadable",
                    "--manifest", "m.json", cwd=tmp_path, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert f"left out sample {datagen.SYNSETS[1]}/broken" in err
    urls = [str(tmp_path / f"out/ds-{i}.tar") for i in range(3)]
    assert fields_of(urls) == files                       # everything else is there
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert sum(len(e.get("unreadable", [])) for e in manifest["shards"]) == 1


# ------------------------------------------------------------------------------------------
# planning and dealing (no Dask)


def test_plan_tsv_and_errors():
    plan = upload.plan_tsv(["b.jpg\t/x/b.jpg", "a.txt\ttext:hi", "b.cls\ttext:3", "# note", ""])
    assert plan == [upload.Sample("b", (("cls", "text:3"), ("jpg", "/x/b.jpg"))),
                    upload.Sample("a", (("txt", "text:hi"),))]
    for bad, msg in ((["noext\t/x"], "no extension"), (["a.jpg /x"], "KEY.EXT<TAB>SOURCE"),
                     (["a.jpg\t/x", "a.jpg\t/y"], "twice"), (["../a.jpg\t/x"], "safe")):
        with pytest.raises(TarprocError, match=msg):
            upload.plan_tsv(bad)


def test_plan_directory_rejects_files_without_extension(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "README").write_text("about")
    with pytest.raises(TarprocError, match="README"):
        upload.plan_directory(str(tmp_path))


def test_plan_files_keys_relative_to_common_dir(tmp_path):
    plan = upload.plan_files(["./d/x/a.jpg", "d/y/b.jpg", "d/x/a.cls"])
    assert [s.key for s in plan] == ["x/a", "y/b"]
    plan = upload.plan_files(["d/x/a.jpg"], root="d")
    assert plan[0].key == "x/a"


@pytest.mark.parametrize("n,shards", [(24, 16), (7, 3), (2, 4), (100, 7)])
def test_deal_at_n_is_even(n, shards):
    samples = [upload.Sample(f"k{i:03d}", (("txt", "text:x"),)) for i in range(n)]
    dealt = upload.deal(samples, f"out/x-@{shards}.tar")
    sizes = [len(s.samples) for s in dealt]
    assert len(dealt) == shards and sum(sizes) == n and max(sizes) - min(sizes) <= 1
    assert [x for s in dealt for x in s.samples] == samples


def test_deal_printf_by_count_and_size():
    samples = [upload.Sample(f"k{i}", (("bin", "text:" + "x" * 1000),)) for i in range(10)]
    dealt = upload.deal(samples, "o/%02d.tar", maxcount=4)
    assert [s.url for s in dealt] == ["o/00.tar", "o/01.tar", "o/02.tar"]
    assert [len(s.samples) for s in dealt] == [4, 4, 2]
    # each sample takes 512 + 1024 bytes of tar; 1024 of trailer
    dealt = upload.deal(samples, "o/{:02d}.tar", maxsize=1024 + 3 * 1536)
    assert [len(s.samples) for s in dealt] == [3, 3, 3, 1]
    with pytest.raises(TarprocError, match="numbered pattern"):
        upload.deal(samples, "o/x-@4.tar", maxcount=3)


def test_python_api_upload(images, dask_cluster, tmp_path):
    from tarproc.jobs.upload_job import upload as do_upload

    root, files = images
    plan = upload.plan_directory(str(root))
    result = do_upload(plan, str(tmp_path / "api-%02d.tar"), maxcount=10,
                       cluster=dask_cluster.address, progress=False)
    assert result.ok and result.samples == N
    assert [e["count"] for e in result.shards] == [10, 10, 4]
    assert fields_of([e["url"] for e in result.shards]) == files


def test_resume_guards_against_another_plan(images, dask_cluster, tmp_path):
    from tarproc.jobs.upload_job import upload as do_upload

    root, _ = images
    out = str(tmp_path / "g-%02d.tar")
    assert do_upload(str(root), out, maxcount=10, cluster=dask_cluster.address, progress=False).ok
    # other limits would put other samples into the existing shards: refused, not mixed
    result = do_upload(str(root), out, maxcount=6, cluster=dask_cluster.address, progress=False)
    assert not result.ok
    assert any("use --force" in error for _, error in result.failed)
    # a shuffle without a seed cannot be resumed
    with pytest.raises(TarprocError, match="--seed"):
        do_upload(str(root), out, maxcount=10, shuffle=True, cluster=dask_cluster.address,
                  progress=False)


def test_dry_run_prints_the_plan_without_dask(images, tmp_path):
    root, _ = images
    proc = htupload(root, "o/x-%02d.tar", "--maxcount", "10", "--dry-run", cwd=tmp_path)
    lines = proc.stdout.decode().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [
        ["o/x-00.tar", "10 samples"], ["o/x-01.tar", "10 samples"], ["o/x-02.tar", "4 samples"]]
    assert not (tmp_path / "o").exists()
