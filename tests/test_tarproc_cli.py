"""The `tarproc` command, run as a user runs it: real bash, real tar shards, real ImageMagick."""

import io
import os
import signal
import subprocess
import tarfile
import time

import pytest

from cli_helpers import BIN, assert_one_line_error, sh, shell_env
from tarproc import iter_samples


@pytest.fixture
def data(imagenet_dir, workdir):
    """The seed commands' working directory: imagenet_train-0000.tgz .. -0007.tgz (10 samples each)."""
    for path in sorted(imagenet_dir.iterdir()):
        (workdir / path.name).symlink_to(path)
    return workdir


def keys_of(path):
    return [s["__key__"] for s in iter_samples(str(path))]


def test_seed_ls_lists_the_sample_files(data):
    proc = sh("cat imagenet_train-0000.tgz | tarproc -c ls --count 3", data, check=True)
    names = proc.stdout.decode().split()
    assert names == ["__key__", "__source__", "sample.cls", "sample.jpg", "sample.json"] * 3


def test_seed_cat_key_prints_three_keys(data):
    proc = sh("cat imagenet_train-0000.tgz | tarproc -c 'cat __key__; echo' --count 3", data, check=True)
    assert proc.stdout.decode().splitlines() == keys_of(data / "imagenet_train-0000.tgz")[:3]
    assert "3 in, 3 out" in proc.stderr.decode()


def test_seed_convert_count_3_writes_ppm(data):
    sh("cat imagenet_train-0000.tgz | tarproc -c 'convert sample.jpg sample.ppm; rm sample.jpg' --count 3 -o out.tar",
       data, check=True)
    inputs = list(iter_samples(str(data / "imagenet_train-0000.tgz")))[:3]
    outputs = list(iter_samples(str(data / "out.tar")))
    assert [s["__key__"] for s in outputs] == [s["__key__"] for s in inputs]
    for i, o in zip(inputs, outputs):
        assert sorted(k for k in o if not k.startswith("__")) == ["cls", "json", "ppm"]
        assert o["cls"] == i["cls"] and o["json"] == i["json"]
        assert o["ppm"].startswith(b"P6\n256 256\n255\n")
        assert len(o["ppm"]) == len(b"P6\n256 256\n255\n") + 256 * 256 * 3
    listing = subprocess.run(["tar", "tvf", str(data / "out.tar")], capture_output=True, text=True)
    assert listing.returncode == 0 and listing.stderr == ""


def test_seed_parallel_convert_keeps_order_and_webdataset_reads_it(data):
    import webdataset as wds

    sh('cat imagenet_train-0000.tgz | tarproc -p 8 -c "convert sample.jpg sample.ppm; rm sample.jpg" -o out.tar',
       data, check=True)
    want = keys_of(data / "imagenet_train-0000.tgz")
    assert keys_of(data / "out.tar") == want
    got = [s["__key__"] for s in wds.WebDataset(str(data / "out.tar"), shardshuffle=False)]
    assert got == want


def test_seed_curl_gm_curl_through_nginx(data, nginx_server):
    (nginx_server.root / "imagenet_train-0000.tgz").write_bytes((data / "imagenet_train-0000.tgz").read_bytes())
    url = nginx_server.url
    sh(f"curl -s {url}/imagenet_train-0000.tgz | tarproc -c 'gm convert sample.jpg sample.ppm; rm sample.jpg' -o - "
       f"| curl -sf -T - {url}/out-0000.tar", data, check=True)
    out = nginx_server.root / "out-0000.tar"
    samples = list(iter_samples(str(out)))
    assert [s["__key__"] for s in samples] == keys_of(data / "imagenet_train-0000.tgz")
    assert all(s["ppm"].startswith(b"P6") for s in samples)


def test_seed_pattern_of_four_shards_to_png(data):
    sh("tarproc -c 'convert sample.jpg sample.png; rm sample.jpg' 'imagenet_train-{0000..0003}.tgz' -o converted.tar",
       data, check=True)
    want = [k for i in range(4) for k in keys_of(data / f"imagenet_train-{i:04d}.tgz")]
    got = list(iter_samples(str(data / "converted.tar")))
    assert [s["__key__"] for s in got] == want
    assert all(s["png"].startswith(b"\x89PNG") and "jpg" not in s for s in got)


def test_sample_dir_environment_and_source(data):
    proc = sh("tarproc -c 'echo \"$TARPROC_INDEX $TARPROC_KEY $(cat __source__) $(stat -c %a .)\"' "
              "imagenet_train-0001.tgz --count 2", data, check=True)
    keys = keys_of(data / "imagenet_train-0001.tgz")
    assert proc.stdout.decode().splitlines() == [
        f"0 {keys[0]} imagenet_train-0001.tgz 700", f"1 {keys[1]} imagenet_train-0001.tgz 700"]


def test_rename_drop_subdirs_and_add_log(data):
    cmd = ("k=$(cat __key__); echo renamed-$k > __key__; "
           "mkdir a b; echo x > a/sample.txt; echo $k-a > a/__key__; echo y > b/sample.txt; echo $k-b > b/__key__; "
           "echo hello")
    sh(f"tarproc -S --add-log log -c '{cmd}' imagenet_train-0000.tgz --count 2 -o out.tar", data, check=True)
    keys = keys_of(data / "imagenet_train-0000.tgz")[:2]
    got = list(iter_samples(str(data / "out.tar")))
    assert [s["__key__"] for s in got] == [x for k in keys for x in (f"renamed-{k}", f"{k}-a", f"{k}-b")]
    assert got[0]["log"] == b"hello\n" and got[1]["txt"] == b"x\n"
    sh("tarproc -c 'rm sample.*' imagenet_train-0000.tgz -o empty.tar", data, check=True)
    assert keys_of(data / "empty.tar") == []


def test_basename_and_script_file(data):
    (data / "job.sh").write_text("#!/bin/bash\nwc -c < img.jpg > img.size\n")
    os.chmod(data / "job.sh", 0o755)
    sh("tarproc -b img -s job.sh imagenet_train-0000.tgz --count 2 -o out.tar", data, check=True)
    got = list(iter_samples(str(data / "out.tar")))
    assert [int(s["size"]) for s in got] == [len(s["jpg"]) for s in got]


def test_python_mapper(data):
    (data / "m.py").write_text(
        "def process_sample(s):\n"
        "    if int(s['cls']) % 2: return None\n"
        "    return {'__key__': s['__key__'], 'cls': s['cls'], 'size': str(len(s['jpg']))}\n")
    sh("tarproc -P m.py 'imagenet_train-{0000..0001}.tgz' -p 2 -o out.tar", data, check=True)
    want = [s for p in ("0000", "0001") for s in iter_samples(str(data / f"imagenet_train-{p}.tgz"))
            if int(s["cls"]) % 2 == 0]
    got = list(iter_samples(str(data / "out.tar")))
    assert [(s["__key__"], int(s["size"])) for s in got] == [(s["__key__"], len(s["jpg"])) for s in want]


def test_failure_aborts_with_key_status_and_stderr_and_no_output(data):
    proc = sh("tarproc -c 'if [ $TARPROC_INDEX = 3 ]; then echo broken image >&2; exit 7; fi' "
              "imagenet_train-0000.tgz -o out.tar", data)
    err = assert_one_line_error(proc, "tarproc")
    key = keys_of(data / "imagenet_train-0000.tgz")[3]
    assert key in err and "failed: command exited with status 7" in err and "broken image" in err
    assert not (data / "out.tar").exists()
    assert [p for p in os.listdir(data) if p.startswith(".out.tar")] == []


@pytest.mark.parametrize("policy,count", [("skip", 9), ("keep", 10)])
def test_failure_skip_and_keep(data, policy, count):
    proc = sh(f"tarproc --errors {policy} -c '[ $TARPROC_INDEX != 3 ] || exit 1; touch sample.new' "
              "imagenet_train-0000.tgz -o out.tar", data, check=True)
    assert len(keys_of(data / "out.tar")) == count
    assert f"1 {'skipped' if policy == 'skip' else 'kept'}" in proc.stderr.decode()


def test_timeout_kills_the_process_group(data, tmp_path):
    marker = tmp_path / "left"
    proc = sh(f"tarproc --timeout 1 -c '(sleep 30; touch {marker}) & sleep 30' imagenet_train-0000.tgz --count 1",
              data, timeout=60)
    err = assert_one_line_error(proc, "tarproc")
    assert "timed out" in err
    time.sleep(0.2)
    assert subprocess.run(["pgrep", "-f", f"touch {marker}"], capture_output=True).returncode == 1


def test_output_on_stdout_sends_command_output_to_stderr(data):
    proc = sh("tarproc -c 'echo chatter' imagenet_train-0000.tgz --count 2 -o - > out.tar", data, check=True)
    assert proc.stderr.decode().count("chatter") == 2
    assert len(keys_of(data / "out.tar")) == 2


def test_not_a_tar_is_a_one_line_error(data):
    (data / "bad.tgz").write_bytes(b"this is not a tar file at all" * 40)
    proc = sh("tarproc -c true bad.tgz -o out.tar", data)
    err = assert_one_line_error(proc, "tarproc")
    assert "bad.tgz" in err and not (data / "out.tar").exists()


def test_truncated_input_from_a_pipe(data):
    proc = sh("head -c 150000 imagenet_train-0000.tgz | tarproc -c true -o out.tar", data)
    assert_one_line_error(proc, "tarproc")
    assert not (data / "out.tar").exists()


def _hostile_tar(path, name):
    with tarfile.open(path, "w") as tar:
        for member, data in (("good.txt", b"ok"), (name, b"evil"), ("after.txt", b"ok")):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("name", ["../escape.txt", "/tmp/abs.txt", "a/../../up.txt", "bad\nname.txt"])
def test_hostile_member_names_are_refused(data, name):
    _hostile_tar(data / "hostile.tar", name)
    proc = sh("tarproc -c 'cat sample.txt' hostile.tar -o out.tar", data)
    assert_one_line_error(proc, "tarproc")
    assert not (data / "out.tar").exists()
    assert not (data.parent / "escape.txt").exists() and not os.path.exists("/tmp/abs.txt")
    proc = sh("tarproc --errors skip -c 'cat sample.txt' hostile.tar -o out.tar", data, check=True)
    assert keys_of(data / "out.tar") == ["good", "after"]


def test_keys_never_reach_the_shell(data, tmp_path):
    marker = tmp_path / "pwned"
    with tarfile.open(data / "evil.tar", "w") as tar:
        info = tarfile.TarInfo(f"$(touch {marker}).txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    sh("tarproc -c 'cat __key__; echo $TARPROC_KEY' evil.tar", data, check=True)
    assert not marker.exists()


def test_sigterm_stops_children_and_leaves_nothing(data, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([str(BIN / "tarproc"), "-p", "2", "--tmpdir", str(tmp), "-c", "sleep 30",
                             "imagenet_train-0000.tgz", "-o", "out.tar"], cwd=data, env=shell_env(),
                            stderr=subprocess.PIPE)
    import psutil

    def sleeping():
        found = []
        for c in psutil.Process(proc.pid).children(recursive=True):
            try:
                if c.cmdline()[:2] == ["sleep", "30"]:
                    found.append(c)
            except psutil.Error:
                pass
        return found

    deadline = time.monotonic() + 20
    children = []
    while len(children) < 2 and time.monotonic() < deadline:  # the two commands running
        time.sleep(0.1)
        children = sleeping()
    assert len(children) == 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert not (data / "out.tar").exists()
    assert [p for p in tmp.rglob("*")] == []
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []


def test_identity_copy_recompresses_by_name(data):
    sh("tarproc 'imagenet_train-{0000..0001}.tgz' -o all.tar.zst", data, check=True)
    assert (data / "all.tar.zst").read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    assert len(keys_of(data / "all.tar.zst")) == 20


def test_python_at_p2_in_chunks_is_the_same_as_at_p1(data):
    (data / "m.py").write_text(
        "import sys\n"
        "def process_sample(s):\n"
        "    print(s['__key__'])\n"
        "    if int(s['cls']) % 3 == 0: return None\n"
        "    if int(s['cls']) % 3 == 1: return s\n"
        "    return [dict(s, __key__=s['__key__'] + '_a'), {'__key__': s['__key__'] + '_b', 'n': b'1'}]\n")
    runs = [sh(f"tarproc -P m.py 'imagenet_train-{{0000..0003}}.tgz' -p {p} -o out{p}.tar", data, check=True)
            for p in (1, 2)]
    assert (data / "out1.tar").read_bytes() == (data / "out2.tar").read_bytes()
    assert runs[0].stdout == runs[1].stdout and len(runs[0].stdout.splitlines()) == 40
    summary = [r.stderr.decode().split(";")[0] for r in runs]
    assert summary[0] == summary[1] and "40 in," in summary[0]


def test_python_at_p2_failure_aborts_or_is_skipped(data):
    (data / "m.py").write_text(
        "def process_sample(s):\n"
        "    if s['__key__'].endswith(KEY): raise ValueError('broken ' + s['__key__'])\n"
        "    return s\n"
        f"KEY = {keys_of(data / 'imagenet_train-0001.tgz')[4]!r}\n")
    key = keys_of(data / "imagenet_train-0001.tgz")[4]
    procs = [sh(f"tarproc -P m.py 'imagenet_train-{{0000..0003}}.tgz' -p {p} -o out.tar", data) for p in (1, 2)]
    err = procs[1].stderr.decode()
    assert procs[1].returncode == 1 and err == procs[0].stderr.decode()  # the traceback's tail too
    assert err.startswith(f"tarproc: error: sample {key!r} failed (exception)") and "ValueError" in err
    assert not (data / "out.tar").exists()
    proc = sh("tarproc --errors skip -P m.py 'imagenet_train-{0000..0003}.tgz' -p 2 -o out.tar", data, check=True)
    assert "40 in, 39 out, 0 dropped, 1 skipped" in proc.stderr.decode()
    assert key not in keys_of(data / "out.tar")


def test_python_at_p2_sigterm_leaves_nothing(data):
    (data / "slow.py").write_text("import time\ndef process_sample(s):\n    time.sleep(0.5)\n    return s\n")
    proc = subprocess.Popen([str(BIN / "tarproc"), "-p", "2", "-P", "slow.py",
                             "imagenet_train-0000.tgz", "imagenet_train-0001.tgz", "-o", "out.tar"],
                            cwd=data, env=shell_env(), stderr=subprocess.PIPE)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert not (data / "out.tar").exists()
    assert [p for p in os.listdir(data) if p.startswith(".out.tar")] == []


def test_output_to_dev_stdout_and_a_fifo_writes_into_them(data):
    """-o /dev/stdout, -o FIFO: written into as they are (never a temp file renamed over them)."""
    proc = sh("tarproc -q -c true -o /dev/stdout imagenet_train-0000.tgz | tar tf - | wc -l", data, check=True)
    assert proc.stdout.decode().split() == ["30"]
    proc = sh("mkfifo out.fifo && { tar tf - < out.fifo | wc -l & } && "
              "tarproc -q -c true -o out.fifo imagenet_train-0000.tgz && wait && test -p out.fifo",
              data, check=True)
    assert proc.stdout.decode().split() == ["30"]
    assert not [n for n in os.listdir(data) if ".tmp-" in n]


def test_help_fits_the_terminal_width_and_start_imports_stay_lean(data):
    """--help is as wide as $COLUMNS; building the parser imports neither shutil nor copy
    (argparse would import shutil, and with it bz2 and lzma, just to find that width)."""
    proc = sh("COLUMNS=60 tarproc --help", data, check=True)
    text = proc.stdout.decode()
    usage = text.split("\n\n")[0].splitlines()
    options = text.split("options:\n")[1].split("\n\n")[0].splitlines()  # (the rest: as written)
    assert len(usage) > 3 and len(options) > 20
    assert max(len(line) for line in usage + options) <= 60
    code = ("import sys; from tarproc.cli.tarproc_cmd import build_parser; build_parser()\n"
            "import tarproc.processing\n"
            "print(sorted(m for m in ('shutil', 'copy', 'bz2', 'lzma') if m in sys.modules))")
    proc = sh(f"python -c \"{code}\"", data, check=True)
    assert proc.stdout.decode().strip() == "[]"


@pytest.mark.parametrize("tool", ["tarproc -q -c true -p 2", "tarproc -q", "tarcat"])
def test_a_reader_that_goes_away_stops_the_command_quietly(data, tool):
    """`... -o - | head -c 100`: exit 141 as a Unix filter killed by SIGPIPE, no error line."""
    out = "" if tool == "tarcat" else " -o -"
    proc = sh(f"{tool} imagenet_train-0000.tgz imagenet_train-0001.tgz{out} | head -c 100 | wc -c; "
              "echo ${PIPESTATUS[0]}", data)
    assert proc.stdout.decode().split() == ["100", "141"], proc.stderr.decode()
    assert proc.stderr.decode() == ""


def test_the_command_ends_without_teardown_but_with_everything_written_and_removed(data):
    """The console script skips the interpreter's teardown (exit_fast): what it printed and
    wrote must still be complete, and its temp dirs gone (atexit ran)."""
    tmp = data / "tmp"
    tmp.mkdir()
    jpgs = sum(len(s["jpg"]) for s in iter_samples(str(data / "imagenet_train-0000.tgz")))
    proc = sh(f"tarproc -q --tmpdir {tmp} -p 2 -c 'cat sample.jpg' imagenet_train-0000.tgz | wc -c",
              data, check=True)
    assert int(proc.stdout) == jpgs
    proc = sh(f"tarproc -q --tmpdir {tmp} -c true imagenet_train-0000.tgz -o - > out.tar && "
              "tar tf out.tar | wc -l", data, check=True)
    assert proc.stdout.decode().split() == ["30"]
    assert os.listdir(tmp) == []
    proc = sh(f"tarproc -q --tmpdir {tmp} -c 'exit 3' imagenet_train-0000.tgz -o bad.tar", data)
    assert proc.returncode == 1 and not (data / "bad.tar").exists() and os.listdir(tmp) == []


def test_output_to_dev_stdout_keeps_command_output_out_of_the_tar(data):
    """-o /dev/stdout is stdout: the commands' output goes to stderr there too, as with -o -."""
    proc = sh("tarproc -q -c 'echo hi' imagenet_train-0000.tgz -o /dev/stdout | tar tf - | wc -l",
              data, check=True)
    assert proc.stdout.decode().split() == ["30"]
    assert proc.stderr.decode().split() == ["hi"] * 10


@pytest.mark.parametrize("how", ["-c 'echo a.b > __key__'", "-P dotkey.py", "-P dotkey.py -p 2"])
def test_a_key_with_a_dot_fails_the_sample_in_one_line(data, how):
    (data / "dotkey.py").write_text(
        "def process_sample(s):\n    s['__key__'] += '.v2'\n    return s\n")
    key = keys_of(data / "imagenet_train-0000.tgz")[0]
    proc = sh(f"tarproc {how} imagenet_train-0000.tgz -o out.tar", data)
    err = assert_one_line_error(proc, "tarproc")
    assert f"sample {key!r}" in err and "refused" in err and len(err.splitlines()) == 1
    assert not (data / "out.tar").exists()
    proc = sh(f"tarproc --errors skip {how} imagenet_train-0000.tgz -o out.tar", data, check=True)
    assert keys_of(data / "out.tar") == [] and "10 skipped" in proc.stderr.decode()
    assert proc.stderr.decode().startswith("tarproc: warning: skipped: sample ")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon"])
def test_timeout_must_be_a_positive_number(data, value):
    proc = sh(f"tarproc --timeout {value} -c true imagenet_train-0000.tgz", data)
    assert proc.returncode == 2 and "--timeout" in proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()


def test_warnings_are_one_line_each(data):
    import tarfile

    with tarfile.open(data / "links.tar", "w") as t:
        for i in range(3):
            info = tarfile.TarInfo(f"k{i}.lnk")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            t.addfile(info)
            info = tarfile.TarInfo(f"k{i}.txt")
            info.size = 1
            t.addfile(info, io.BytesIO(b"x"))
    proc = sh("tarproc -q links.tar -o out.tar", data, check=True)
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 3 and all(line.startswith("tarproc: warning: ") for line in lines)
    assert "k1.lnk" in lines[1] and len(keys_of(data / "out.tar")) == 3


def test_a_missing_local_input_fails_before_any_sample_runs(data):
    proc = sh("tarproc -c 'touch $OUT/ran-$TARPROC_INDEX' 'imagenet_train-{0000,0001,0042,0043}.tgz' -o out.tar",
              data, env={"OUT": str(data)})
    err = assert_one_line_error(proc, "tarproc")
    assert "cannot open imagenet_train-0042.tgz: No such file or directory" in err
    assert "1 more of the 4 inputs missing too" in err
    assert not [n for n in os.listdir(data) if n.startswith("ran-")] and not (data / "out.tar").exists()


def test_unbuffered_python_loses_nothing_on_a_slow_pipe(data):
    """Under PYTHONUNBUFFERED=1 (many containers, CI) sys.stdout.buffer is a raw stream whose
    writes to a pipe may be partial: the tar stream and the commands' output must still arrive
    whole, byte for byte (this once lost data in about a third of the runs)."""
    env = {"PYTHONUNBUFFERED": "1"}
    sh("tarproc -q -c true imagenet_train-0000.tgz -o ref.tar", data, check=True)
    jpgs = sum(len(s["jpg"]) for s in iter_samples(str(data / "imagenet_train-0000.tgz")))
    for _ in range(8):
        proc = sh("tarproc -q -p 2 -c true imagenet_train-0000.tgz -o - | (sleep 0.05; cat > out.tar)",
                  data, check=True, env=env)
        assert (data / "out.tar").read_bytes() == (data / "ref.tar").read_bytes()
        proc = sh("tarproc -q -p 2 -c 'cat sample.jpg' imagenet_train-0000.tgz | (sleep 0.05; wc -c)",
                  data, check=True, env=env)
        assert int(proc.stdout) == jpgs


@pytest.mark.parametrize("how", [
    "-c 'echo same > __key__'",
    "-c 'echo same > __key__' -p 2",
    "-P samekey.py",
    "-P samekey.py -p 2",  # chunks: found in a worker
    "-P samekey.py -p 2 --count 9",  # raw samples: found in a worker
    "-P twice.py -p 2",  # two outputs of one sample
    "-S -c 'mkdir d && cp __key__ sample.cls d/'",  # a subdir sample with the dir's own key
])
def test_consecutive_output_samples_with_one_key_are_refused(data, how):
    """Readers group consecutive members by key (webdataset fails on the result): an output
    that would hold two samples of one key in a row is an error naming the output and the key,
    whatever the path the samples take, and nothing is written. Without -o they are dropped:
    no error."""
    (data / "samekey.py").write_text(
        "def process_sample(s):\n    s['__key__'] = 'same'\n    return s\n")
    (data / "twice.py").write_text(
        "def process_sample(s):\n    return [s, dict(s, txt=b'again')]\n")
    key = "same" if "same" in how else keys_of(data / "imagenet_train-0000.tgz")[0]
    proc = sh(f"tarproc {how} imagenet_train-0000.tgz -o out.tar", data)
    err = assert_one_line_error(proc, "tarproc")
    assert len(err.splitlines()) == 1, err
    assert f"out.tar: two consecutive output samples have the key {key!r}" in err
    assert not (data / "out.tar").exists()
    sh(f"tarproc -q {how} imagenet_train-0000.tgz", data, check=True)


@pytest.mark.filterwarnings("ignore:.*split")  # the same key again, further on
def test_samples_of_one_key_at_the_seam_of_two_inputs_are_refused(data):
    from tarproc.streams import write_samples

    first = list(iter_samples(str(data / "imagenet_train-0000.tgz")))
    write_samples(str(data / "a.tar"), first[:3])
    write_samples(str(data / "b.tar"), first[2:5])  # starts with a.tar's last sample
    proc = sh("tarproc -c true a.tar b.tar -o out.tar", data)
    err = assert_one_line_error(proc, "tarproc")
    assert f"the key {first[2]['__key__']!r}" in err and not (data / "out.tar").exists()
    sh("tarproc -c true a.tar a.tar -o out.tar", data, check=True)  # a.tar again: apart
    assert keys_of(data / "out.tar") == [s["__key__"] for s in first[:3]] * 2


# ------------------------------------------------------------------ -P: code that ends or kills its process

# Dies only in a -p N worker process, never in tarproc itself (which runs batches too at -p 2).
_IN_A_WORKER = "import multiprocessing, os, signal\n" \
               "def in_a_worker():\n" \
               "    return multiprocessing.parent_process() is not None\n"


@pytest.mark.parametrize("p", [1, 2])
def test_python_sys_exit_is_a_sample_failure(data, p):
    key = keys_of(data / "imagenet_train-0001.tgz")[4]
    (data / "ex.py").write_text("import sys\n"
                                "def process_sample(s):\n"
                                f"    if s['__key__'] == {key!r}: sys.exit(3)\n"
                                "    return s\n")
    proc = sh(f"tarproc -P ex.py -p {p} 'imagenet_train-{{0000..0003}}.tgz' -o out.tar", data)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.startswith(f"tarproc: error: sample {key!r} failed (exception): "
                                                   "process_sample raised SystemExit: 3; no output written\n")
    tail = err.splitlines()[1:]  # the script's traceback, as the last lines of a command's stderr
    assert all(line.startswith("  | ") for line in tail) and tail[-1] == "  | SystemExit: 3", err
    assert "pyscript.py" not in err and not (data / "out.tar").exists()
    proc = sh(f"tarproc -P ex.py -p {p} --errors skip 'imagenet_train-{{0000..0003}}.tgz' -o out.tar", data,
              check=True)
    assert "40 in, 39 out, 0 dropped, 1 skipped" in proc.stderr.decode()
    assert len(keys_of(data / "out.tar")) == 39


@pytest.mark.parametrize("how", ["os._exit(0)", "os.kill(os.getpid(), signal.SIGSEGV)"])
def test_a_worker_process_that_dies_is_a_one_line_error(data, how):
    (data / "die.py").write_text(_IN_A_WORKER + "def process_sample(s):\n"
                                 f"    if in_a_worker(): {how}\n"
                                 "    return s\n")
    keys = [k for i in range(4) for k in keys_of(data / f"imagenet_train-{i:04d}.tgz")]
    for extra in ["", "", "", "--count 30"]:  # (how it shows varied from run to run)
        proc = sh(f"tarproc -P die.py -p 2 {extra} 'imagenet_train-{{0000..0003}}.tgz' -o out.tar", data)
        err = assert_one_line_error(proc, "tarproc")
        assert proc.returncode == 1 and len(err.splitlines()) == 1, err
        assert "a worker process (pid " in err and " died (" in err
        assert ("exit status 0" if "_exit" in how else "killed by signal 11 (SIGSEGV)") in err
        assert "while running sample(s) " in err and any(repr(k) in err for k in keys), err
        assert not (data / "out.tar").exists() and not [n for n in os.listdir(data) if ".tmp-" in n]


def test_keyboard_interrupt_raised_by_python_code_at_p2_exits_130(data):
    (data / "ki.py").write_text("def process_sample(s):\n    raise KeyboardInterrupt\n")
    for _ in range(3):
        proc = sh("tarproc -P ki.py -p 2 'imagenet_train-{0000..0003}.tgz' -o out.tar", data)
        assert proc.returncode == 130 and proc.stderr.decode() == "tarproc: error: interrupted\n"
        assert not (data / "out.tar").exists()


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("what,named", [("s['txt'] = '\\udcff'", "field 'txt'"),
                                        ("s['t\\udcff'] = b'x'", "field name 't\\udcff'"),
                                        ("s['__key__'] = 'k\\udcff'", "key 'k\\udcff'")])
def test_python_str_that_is_not_unicode_text_fails_the_sample(data, p, what, named):
    (data / "sur.py").write_text(f"def process_sample(s):\n    {what}\n    return s\n")
    key = keys_of(data / "imagenet_train-0000.tgz")[0]
    proc = sh(f"tarproc -P sur.py -p {p} imagenet_train-0000.tgz -o out.tar", data)
    err = assert_one_line_error(proc, "tarproc")
    assert proc.returncode == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"tarproc: error: sample {key!r} failed") and named in err
    assert "not valid Unicode text" in err and not (data / "out.tar").exists()
    proc = sh(f"tarproc -P sur.py -p {p} --errors skip imagenet_train-0000.tgz -o out.tar", data, check=True)
    assert "10 in, 0 out, 0 dropped, 10 skipped" in proc.stderr.decode()


@pytest.mark.parametrize("option", ["--timeout 5", "--add-log log", "-b img", "-S", "--tmpdir .", "--keep-dirs",
                                    "--shell sh", "--interpreter python3"])
@pytest.mark.parametrize("what", ["-P m.py", ""])
def test_options_of_shell_commands_are_refused_where_they_do_nothing(data, option, what):
    (data / "m.py").write_text("import os\nopen('ran', 'w').close()\ndef process_sample(s):\n    return s\n")
    proc = sh(f"tarproc {what} {option} imagenet_train-0000.tgz -o out.tar", data)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(f"tarproc: error: {option.split()[0]}")
    assert ("applies to -s only" if "interpreter" in option else "applies to -c/-s only") in err
    assert not (data / "out.tar").exists() and not (data / "ran").exists()


def test_interpreter_with_a_command_is_refused_and_with_a_script_works(data):
    proc = sh("tarproc -c true --interpreter python3 imagenet_train-0000.tgz", data)
    assert proc.returncode == 2 and "--interpreter applies to -s only" in proc.stderr.decode()
    (data / "s.py").write_text("open('sample.py_ran', 'w').write('1')\n")
    sh("tarproc -s s.py --interpreter python3 --shell sh -b sample imagenet_train-0000.tgz --count 2 -o out.tar",
       data, check=True)
    assert [s["py_ran"] for s in iter_samples(str(data / "out.tar"))] == [b"1", b"1"]


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("returned", ["{}", "{'__key__': s['__key__']}", "[{'__key__': s['__key__'] + 'x'}]",
                                      "{'__key__': s['__key__'], '__url__': 'u'}"])
def test_python_outputs_without_fields_are_dropped(data, p, returned):
    (data / "m.py").write_text(f"def process_sample(s):\n    return {returned}\n")
    for count in ("", "--count 7"):  # (chunks, raw samples)
        proc = sh(f"tarproc -P m.py -p {p} {count} 'imagenet_train-{{0000..0001}}.tgz' -o out.tar", data, check=True)
        n = 7 if count else 20
        assert f"{n} in, 0 out, {n} dropped, 0 skipped" in proc.stderr.decode()
        assert keys_of(data / "out.tar") == []


def test_timeouts_too_large_to_use_are_refused(data):
    for value in ["inf", "1e30", "1000001"]:
        proc = sh(f"tarproc --timeout {value} -c true imagenet_train-0000.tgz", data)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and "--timeout" in err and "at most 1000000 seconds" in err
        assert "Traceback" not in err
    sh("tarproc --timeout 1e6 -c true --count 2 imagenet_train-0000.tgz", data, check=True)


@pytest.mark.parametrize("option", ["-p 100000", "-p 0", "--max-member-size -5", "--max-member-size 0"])
def test_counts_out_of_range_are_usage_errors(data, option):
    proc = sh(f"tarproc -q {option} -c true --count 3 imagenet_train-0000.tgz", data)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(f"tarproc: error: argument {option.split()[0]}")
    assert ("at most 1024" if "100000" in option else "at least 1") in err


@pytest.mark.parametrize("cmd,status,message,out", [
    ("tarproc -c 'echo hi' --count 2 imagenet_train-0000.tgz -o o.tar >&-", 1,
     "tarproc: error: cannot write what the commands printed: standard output is closed", "o.tar"),
    ("tarproc imagenet_train-0000.tgz -o - >&-", 1, "tarproc: error: standard output is closed", None),
    ("tarproc -c true -o o.tar <&-", 1, "tarproc: error: standard input is closed", "o.tar"),
    ("tarproc -P m.py -p 2 -o o.tar - <&-", 1, "tarproc: error: standard input is closed", "o.tar"),
    ("tarproc -c true --count 2 imagenet_train-0000.tgz -o o.tar >&-", 0, "tarproc: 2 in, 2 out", "o.tar"),
    ("tarproc -c 'echo hi; echo err >&2' --count 2 imagenet_train-0000.tgz -o - 2>&- > o.tar", 0, "", "o.tar"),
    ("tarproc -c true --count 2 imagenet_train-0000.tgz -o o.tar 2>&- <&-", 0, "", "o.tar"),
])
def test_closed_standard_streams(data, cmd, status, message, out):
    """A closed stderr: the job works; a closed stdout or stdin: fine unless the job needs it,
    then one line saying so (the commands' output too is refused, not lost silently)."""
    (data / "m.py").write_text("def process_sample(s):\n    return s\n")
    proc = sh(cmd, data)
    err = proc.stderr.decode()
    assert proc.returncode == status and "Traceback" not in err, err
    assert err.startswith(message) and len(err.splitlines()) <= 1, err
    if out:
        assert (data / out).exists() == (status == 0)
        if status == 0:
            assert len(keys_of(data / out)) == 2


def test_debug_shows_the_traceback_of_the_error(data):
    (data / "bad.tar").write_bytes(b"not a tar")
    proc = sh("tarproc bad.tar", data, env={"TARPROC_DEBUG": "1"})
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.startswith("tarproc: error: bad.tar: not a tar archive")
    assert "Traceback (most recent call last)" in err and "FormatError" in err and "NoneType: None" not in err
