"""htmapper, htextract and htls on real shards, a real local cluster and a real dask-scheduler
with dask-worker processes; nginx (WebDAV) for http input and output."""

import json
import os
import shutil
import subprocess
import threading
import time

import pytest

from cli_helpers import BIN, assert_one_line_error, sh
from tarproc import iter_samples
from tarproc.jobs.shardmap import JobFailed, map_shards

SEED_SCRIPT = '''\
def process_sample(record):
    if "bin.png" not in record: return None
    if "lines.png" not in record: return None
    return {"__key__": record["__key__"], "png": record["bin.png"], "lines.png": record["lines.png"]}
'''


@pytest.fixture
def data(imagenet_dir, uw3_dir, workdir):
    """workdir/data/: imagenet_train-0000..0007.tgz, Volume_00..15.tgz, uw3-lines.tgz."""
    d = workdir / "data"
    d.mkdir()
    for src in (imagenet_dir, uw3_dir):
        for path in sorted(src.iterdir()):
            shutil.copy(path, d / path.name)
    shutil.copy(uw3_dir / "Volume_00.tgz", d / "uw3-lines.tgz")
    (workdir / "script.py").write_text(SEED_SCRIPT)
    return workdir


def samples_of(path):
    return list(iter_samples(str(path)))


def test_seed_htmapper_on_dask_scheduler_over_nginx(data, nginx_server, dask_scheduler_address):
    for i in range(16):
        shutil.copy(data / f"data/Volume_{i:02d}.tgz", nginx_server.root / f"Volume_{i:02d}.tgz")
    url = nginx_server.url
    host_port = dask_scheduler_address.replace("tcp://", "").replace("127.0.0.1", "localhost")
    proc = sh(f"htmapper -c {host_port} -p script.py '{url}/Volume_@16.tgz' '{url}/processed-@16.tgz'",
              data, check=True, timeout=180)
    assert "16 shards: 16 done" in proc.stderr.decode()
    for i in range(16):
        src = samples_of(data / f"data/Volume_{i:02d}.tgz")
        out = samples_of(nginx_server.root / f"processed-{i:02d}.tgz")
        want = [s for s in src if "lines.png" in s]
        assert [s["__key__"] for s in out] == [s["__key__"] for s in want]
        assert all(o["png"] == w["bin.png"] and o["lines.png"] == w["lines.png"] for o, w in zip(out, want))
        assert (nginx_server.root / f"processed-{i:02d}.tgz").read_bytes()[:2] == b"\x1f\x8b"


def test_seed_htmapper_python_local_cluster(data):
    (data / "script.py").write_text(
        "def process_sample(s):\n    return {'__key__': s['__key__'], 'cls': s['cls'], 'n': str(len(s['jpg']))}\n")
    proc = sh("htmapper -p script.py 'data/imagenet_train-{0000..0007}.tgz' 'out/converted-@8.tar' "
              "--stats stats.json --log-dir logs", data, check=True, timeout=180)
    assert "8 shards: 8 done, 0 skipped, 0 failed" in proc.stderr.decode()
    for i in range(8):
        src = samples_of(data / f"data/imagenet_train-{i:04d}.tgz")
        out = samples_of(data / f"out/converted-{i}.tar")
        assert [(o["__key__"], int(o["n"])) for o in out] == [(s["__key__"], len(s["jpg"])) for s in src]
    stats = json.loads((data / "stats.json").read_text())
    assert stats["totals"]["samples_in"] == 80 and stats["totals"]["samples_out"] == 80
    assert {item["status"] for item in stats["items"]} == {"done"}
    assert all(item["worker"] and item["attempts"] >= 1 for item in stats["items"])
    # a rerun skips every finished shard and says so
    proc = sh("htmapper -p script.py 'data/imagenet_train-{0000..0007}.tgz' 'out/converted-@8.tar'",
              data, check=True, timeout=180)
    assert "skipped 8 shard" in proc.stderr.decode()


def test_seed_htmapper_shell_command(data, dask_scheduler_address):
    sh(f"htmapper -c {dask_scheduler_address} -C 'convert sample.jpg sample.png; rm sample.jpg' "
       "'data/imagenet_train-@0008.tgz' 'out/png-@8.tar'", data, check=True, timeout=180)
    for i in range(8):
        out = samples_of(data / f"out/png-{i}.tar")
        assert len(out) == 10 and all(o["png"].startswith(b"\x89PNG") and "jpg" not in o for o in out)


def test_pattern_lengths_must_match_before_any_work(data):
    proc = sh("htmapper -p script.py 'data/imagenet_train-@0008.tgz' 'out/x-@4.tar'", data)
    err = assert_one_line_error(proc, "htmapper")
    assert "names 4 output shard(s) but there are 8 input" in err
    assert not (data / "out").exists()


@pytest.mark.parametrize("script, message", [
    ("def process_sample(s)\n  return s\n", "bad.py: syntax error at line 1: expected ':'"),
    ("x = 1\n", "bad.py: does not define process_sample(sample)"),
    ("import no_such_module_here\n", "bad.py, line 1: ModuleNotFoundError while loading: "
                                      "No module named 'no_such_module_here'"),
])
def test_htmapper_broken_script_is_one_error_before_any_work(data, script, message):
    (data / "bad.py").write_text(script)
    proc = sh("htmapper -j 2 -p bad.py 'data/imagenet_train-@0008.tgz' 'out/x-@8.tar'", data, timeout=60)
    err = assert_one_line_error(proc, "htmapper")
    assert err.strip() == f"htmapper: error: {message}"  # no local cluster started, no task, no retry
    assert not (data / "out").exists()


def test_seed_htextract_text(data, dask_scheduler_address):
    proc = sh(f"htextract -c {dask_scheduler_address} data/uw3-lines.tgz -f text", data, check=True)
    want = [s["text"].decode() for s in samples_of(data / "data/uw3-lines.tgz")]
    assert proc.stdout.decode().splitlines() == want


def test_seed_htextract_keys_and_classes_in_shard_order(data, dask_scheduler_address):
    proc = sh(f"htextract -c {dask_scheduler_address} 'data/imagenet_train-@0008.tgz' -f __key__ -f cls",
              data, check=True)
    want = [f"{s['__key__']}\t{s['cls'].decode()}"
            for i in range(8) for s in samples_of(data / f"data/imagenet_train-{i:04d}.tgz")]
    assert proc.stdout.decode().splitlines() == want


def test_htextract_counts_json_escaping_and_keys(data, dask_scheduler_address):
    addr = dask_scheduler_address
    proc = sh(f"htextract -c {addr} 'data/imagenet_train-@0008.tgz' --counts cls", data, check=True)
    from collections import Counter
    want = Counter(s["cls"].decode() for i in range(8) for s in samples_of(data / f"data/imagenet_train-{i:04d}.tgz"))
    rows = [line.split("\t") for line in proc.stdout.decode().splitlines()]
    assert {v: int(n) for n, v in rows} == dict(want)
    assert [int(n) for n, _ in rows] == sorted((int(n) for n, _ in rows), reverse=True)
    proc = sh(f"htextract -c {addr} 'data/Volume_@16.tgz' -K", data, check=True)
    counts = {v: int(n) for n, v in (line.split("\t") for line in proc.stdout.decode().splitlines())}
    assert counts == {"__key__": 160, "bin.png": 160, "text": 160, "lines.png": 128}
    proc = sh(f"htextract -c {addr} data/uw3-lines.tgz -f __key__ -f lines.png --json --count 5 -o x.jsonl",
              data, check=True)
    rows = [json.loads(line) for line in (data / "x.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and rows[4]["lines.png"] is None and rows[0]["__key__"] == "book0000/page000"


def test_htextract_escapes_tabs_and_newlines(workdir):
    from tarproc import write_samples
    write_samples("t.tar", [{"__key__": "a", "txt": b"one\ttwo\nthree\\"}])
    proc = sh("htextract -q -j 1 t.tar -f txt", workdir, check=True)
    assert proc.stdout == b"one\\ttwo\\nthree\\\\\n"


def test_htextract_counts_and_field_names_escaped_like_cells_and_as_json(workdir):
    from tarproc import write_samples
    write_samples("t.tar", [{"__key__": "a", "txt": b"one\ttwo\nthree\\"},
                            {"__key__": "b", "txt": b"\xff\xfebin"}, {"__key__": "c", "txt": b"\xff\xfebin"}])
    cells = sh("htextract -q -j 1 t.tar -f txt", workdir, check=True).stdout.decode().splitlines()
    assert cells == ["one\\ttwo\\nthree\\\\", "\\\\xff\\\\xfebin", "\\\\xff\\\\xfebin"]
    rows = sh("htextract -q -j 1 t.tar --counts txt", workdir, check=True).stdout.decode().splitlines()
    assert rows == [f"2\t{cells[1]}", f"1\t{cells[0]}"]  # one line per value, escaped as -f escapes
    rows = sh("htextract -q -j 1 t.tar --counts txt --json", workdir, check=True).stdout.decode().splitlines()
    assert [json.loads(r) for r in rows] == [{"value": "\\xff\\xfebin", "count": 2},
                                             {"value": "one\ttwo\nthree\\", "count": 1}]
    rows = sh("htextract -q -j 1 t.tar -K --json --count 1", workdir, check=True).stdout.decode().splitlines()
    assert [json.loads(r) for r in rows] == [{"field": "__key__", "count": 3}]
    proc = sh("htextract -q -j 1 t.tar -K --count -1", workdir)
    assert proc.returncode == 2 and b"--count: must not be negative" in proc.stderr


def test_htextract_output_file_appears_only_when_every_shard_succeeded(workdir):
    from tarproc import write_samples
    write_samples("in-0.tar", [{"__key__": f"k{i}", "txt": b"x"} for i in range(3)])
    (workdir / "in-1.tar").write_bytes(b"garbage")
    (workdir / "old.txt").write_text("important\n")
    for args in ("-f __key__", "--counts txt", "-K"):
        proc = sh(f"htextract -q -j 2 'in-@2.tar' {args} -o old.txt", workdir)
        assert proc.returncode == 1 and "in-1.tar" in proc.stderr.decode()
        assert "nothing written to old.txt" in proc.stderr.decode()
        assert (workdir / "old.txt").read_text() == "important\n"  # neither emptied nor partial
        proc = sh(f"htextract -q -j 1 'nomatch-*.tar' {args} -o old.txt", workdir)
        assert_one_line_error(proc, "htextract")
        assert (workdir / "old.txt").read_text() == "important\n"
    assert sorted(p.name for p in workdir.iterdir()) == ["in-0.tar", "in-1.tar", "old.txt"]
    os.remove(workdir / "in-1.tar")
    sh("htextract -q -j 2 'in-{0..0}.tar' -f __key__ -o old.txt", workdir, check=True)
    assert (workdir / "old.txt").read_text() == "k0\nk1\nk2\n"


def test_rerun_takes_neither_an_empty_file_nor_a_directory_for_a_finished_shard(data):
    (data / "out").mkdir()
    (data / "out/x-1.tar").write_bytes(b"")  # e.g. `touch`ed, or left by another tool
    (data / "out/x-2.tar").mkdir()
    proc = sh("htmapper -j 2 --retries 0 -p script.py 'data/Volume_@04.tgz' 'out/x-@4.tar'", data, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "skipped" not in err.split("failed:")[0], err
    assert "failed: " in err and "x-2.tar: is a directory" in err
    assert len(samples_of(data / "out/x-1.tar")) == 8  # rewritten, not skipped
    proc = sh("htls -l 'out/x-@4.tar'", data)
    assert proc.returncode == 1 and "missing: out/x-2.tar" in proc.stdout.decode()


def test_credentials_in_input_urls_never_reach_messages_logs_or_commands(data, flaky_http_server):
    """A user:password (or a signed query) in an input URL: every error line, --stats, --log-dir
    file name and the commands' __source__ show it redacted."""
    srv = flaky_http_server
    shutil.copy(data / "data/imagenet_train-0000.tgz", srv.root / "good.tgz")
    (srv.root / "garbage.tgz").write_bytes(b"<html>not a tar</html>" * 100)
    base = srv.url.replace("http://", "http://user:secret@")
    proc = sh(f"htmapper -q -j 1 --retries 0 --log-dir logs --stats st.json -p script.py "
              f"'{base}/{{garbage,missing}}.tgz' 'out/o-{{0,1}}.tar'", data, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "not a tar archive" in err and "404" in err
    assert "secret" not in err and "secret" not in (data / "st.json").read_text()
    assert not [p for p in os.listdir(data / "logs") if "secret" in p]
    for cmd in (f"tarproc -q '{base}/garbage.tgz' -o x.tar",
                f"tarcat '{srv.url}/garbage.tgz?X-Amz-Signature=SIGSECRET' -o x.tar"):
        proc = sh(cmd, data)
        err = assert_one_line_error(proc, cmd.split()[0])
        assert "not a tar archive" in err and "secret" not in err.lower()
    proc = sh(f"tarproc -q -c 'cat __source__; echo; echo $TARPROC_SOURCE' --count 1 '{base}/good.tgz'", data, check=True)
    assert proc.stdout.decode().split() == [f"{srv.url.replace('http://', 'http://***@')}/good.tgz"] * 2


def test_seed_htls(data):
    os.remove(data / "data/imagenet_train-0005.tgz")
    proc = sh("htls 'data/imagenet_train-@0008.tgz'", data)
    out = proc.stdout.decode()
    assert proc.returncode == 1
    assert out.startswith("8 shards, 1 missing,") and "skew (max/mean)" in out
    assert "missing: data/imagenet_train-0005.tgz" in out
    proc = sh("htls -l --samples -j 2 'data/Volume_@16.tgz'", data, check=True)
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 17 and all(line.split("\t")[1] == "10" for line in lines[:16])
    assert "160 samples" in lines[-1]


def test_corrupt_shard_fails_clearly_others_complete(data, dask_scheduler_address):
    bad = data / "data/imagenet_train-0003.tgz"
    bad.write_bytes(bad.read_bytes()[:20000])
    proc = sh(f"htmapper -c {dask_scheduler_address} --retries 1 -C true 'data/imagenet_train-@0008.tgz' 'out/o-@8.tar'",
              data, timeout=180)
    err = assert_one_line_error(proc, "htmapper")
    assert "1 of 8 shard(s) failed" in err and "imagenet_train-0003.tgz" in err
    assert sorted(os.listdir(data / "out")) == [f"o-{i}.tar" for i in range(8) if i != 3]


def test_retry_after_a_transient_failure(data, dask_scheduler_address, tmp_path):
    flag = tmp_path / "failed-once"

    def flaky(sample):
        if not flag.exists():
            flag.write_text("x")
            raise RuntimeError("transient")
        return sample

    result = map_shards(str(data / "data/imagenet_train-{0000..0001}.tgz"), str(data / "out/r-@2.tar"),
                        flaky, cluster=dask_scheduler_address, progress=False)
    assert result.ok and result.done == 2
    assert max(item["attempts"] for item in result.items) == 2
    assert len(samples_of(data / "out/r-0.tar")) == 10


def test_rerun_after_interruption_does_only_missing_shards(data, tmp_path):
    inputs = str(data / "data/imagenet_train-{0000..0007}.tgz")
    outputs = str(data / "out/m-@8.tar")
    with pytest.raises(JobFailed):
        map_shards(inputs, outputs, _fail_on_shard_5, workers=2, retries=0, progress=False, check=True)
    assert len(os.listdir(data / "out")) == 7
    first = {p: os.stat(data / "out" / p).st_mtime_ns for p in os.listdir(data / "out")}
    result = map_shards(inputs, outputs, _identity, workers=2, progress=False)
    assert (result.done, result.skipped) == (1, 7)
    assert all(os.stat(data / "out" / p).st_mtime_ns == t for p, t in first.items())
    assert [len(samples_of(data / f"out/m-{i}.tar")) for i in range(8)] == [10] * 8


def _fail_on_shard_5(sample):
    if sample["__url__"].endswith("0005.tgz"):
        raise ValueError("boom")
    return sample


def _identity(sample):
    return sample


def test_killed_worker_loses_no_sample(data, dask_cluster, dask_scheduler_address):
    def slow(sample):
        time.sleep(0.15)
        return sample

    def killer():
        time.sleep(3)
        dask_cluster.kill_worker()

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        result = map_shards(str(data / "data/imagenet_train-{0000..0007}.tgz"), str(data / "out/k-@8.tar"),
                            slow, cluster=dask_scheduler_address, progress=False, speculation=False)
    finally:
        thread.join()
        dask_cluster.restore(2)
    assert result.ok and result.done == 8
    for i in range(8):
        src = samples_of(data / f"data/imagenet_train-{i:04d}.tgz")
        assert samples_of(data / f"out/k-{i}.tar") == [dict(s, __url__=str(data / f"out/k-{i}.tar")) for s in src]


def test_slow_shard_gets_a_speculative_copy(data, dask_scheduler_address, tmp_path):
    flag = tmp_path / "slow-once"

    def sometimes_slow(sample):
        if sample["__url__"].endswith("0001.tgz") and not flag.exists():
            flag.write_text("x")
            time.sleep(25)
        return sample

    result = map_shards(str(data / "data/imagenet_train-{0000..0005}.tgz"), str(data / "out/s-@6.tar"),
                        sometimes_slow, cluster=dask_scheduler_address, progress=False,
                        spec_factor=3.0, spec_min_seconds=2.0)
    assert result.ok and result.speculated >= 1
    assert [len(samples_of(data / f"out/s-{i}.tar")) for i in range(6)] == [10] * 6
    assert any(item.get("speculative") for item in result.items)


def test_log_dir_keeps_each_shards_command_stderr_and_warnings(data):
    proc = sh("htmapper -j 2 -C 'echo \"converting $TARPROC_KEY\" >&2' --log-dir logs "
              "'data/imagenet_train-{0000..0001}.tgz' 'out/l-@2.tar'", data, check=True, timeout=180)
    logs = sorted((data / "logs").iterdir())
    assert len(logs) == 2, proc.stderr
    for i, log in enumerate(logs):
        text = log.read_text()
        keys = [s["__key__"] for s in samples_of(data / f"data/imagenet_train-{i:04d}.tgz")]
        assert "imagenet_train-000" in log.name
        assert [f"converting {k}" for k in keys] == [line for line in text.splitlines() if line.startswith("converting")]


@pytest.mark.parametrize("tool", ["htmapper -C true", "htshuffle", "htsort"])
def test_workers_must_be_at_least_one(tool, tmp_path):
    proc = subprocess.run(f"{BIN}/{tool} -j 0 a-@2.tar b-@2.tar", shell=True, capture_output=True,
                          cwd=tmp_path)
    assert proc.returncode == 2 and b"must be at least 1, not 0" in proc.stderr


def test_htmapper_refuses_two_outputs_of_one_key_in_a_row(data, dask_scheduler_address):
    """A mapper that returns a sample twice would make readers merge the two: each shard fails
    naming its output and the key, at once (retrying cannot help), and no output is written."""
    (data / "twice.py").write_text("def process_sample(s):\n    return [s, dict(s)]\n")
    proc = sh(f"htmapper -c {dask_scheduler_address} -p twice.py --stats stats.json "
              "'data/imagenet_train-{0000..0001}.tgz' 'out/twice-@2.tar'", data, timeout=180)
    err = assert_one_line_error(proc, "htmapper")
    stats = json.loads((data / "stats.json").read_text())
    assert [item["attempts"] for item in stats["items"]] == [1, 1]  # the same data: no retry
    for i in range(2):
        key = samples_of(data / f"data/imagenet_train-{i:04d}.tgz")[0]["__key__"]
        assert f"out/twice-{i}.tar: two consecutive output samples have the key {key!r}" in err, err
    assert not (data / "out").exists() or not list((data / "out").iterdir())


def test_missing_local_inputs_are_one_error_before_any_work(data):
    for cmd in ("htmapper -j 1 -C true 'nonexist-@2.tar' 'o-@2.tar'", "htextract -j 1 -f cls 'nonexist-@2.tar'"):
        proc = sh(cmd, data)
        err = assert_one_line_error(proc, cmd.split()[0])
        assert err.strip().endswith("no such input shard: " + ", ".join(
            str(data / f"nonexist-{i}.tar") for i in range(2))), err
        assert "local cluster" not in err  # nothing started


def test_htls_tells_an_unreachable_server_from_missing_shards(data):
    from servers import free_port

    proc = sh(f"htls 'http://127.0.0.1:{free_port()}/Volume_@1.tgz'", data, timeout=120)  # (~30 s of retries)
    err = assert_one_line_error(proc, "htls")
    assert "cannot check http://127.0.0.1:" in err and "missing" not in proc.stdout.decode()
