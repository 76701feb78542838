"""ShellRunner and PythonRunner on single samples: real bash, real ImageMagick, real files."""

import os
import pickle
import shutil
import subprocess
import time

import psutil
import pytest

from tarproc.errors import SampleFailed, UnsafeNameError
from tarproc.runner import PythonRunner, ScriptError, ShellRunner, load_process_sample
from tarproc.runner import normalize_result

CONVERT = shutil.which("convert", path="/usr/bin") or shutil.which("convert")


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory):
    """A real 32x32 red JPEG made by ImageMagick."""
    d = tmp_path_factory.mktemp("img")
    subprocess.run([CONVERT, "-size", "32x32", "xc:red", str(d / "a.jpg")], check=True)
    return (d / "a.jpg").read_bytes()


@pytest.fixture
def base(tmp_path):
    """A private temp base for the runner, to count what is left in it."""
    d = tmp_path / "base"
    d.mkdir()
    return d


def leftovers(base):
    """Everything under base except the runners' (empty) private roots' own directory entry."""
    found = []
    for root, dirs, files in os.walk(base):
        found += [os.path.join(root, f) for f in files]
        found += [os.path.join(root, d) for d in dirs if root != str(base)]
    return found


def sample(jpeg=b"x", key="n01440764_10026"):
    return {"__key__": key, "__url__": "imagenet_train-0000.tgz", "jpg": jpeg, "cls": b"0",
            "json": b'{"a": 1}'}


def test_files_key_source_env(base, jpeg):
    r = ShellRunner("ls; cat __key__; echo; cat __source__; echo; "
                    'echo "$TARPROC_KEY|$TARPROC_INDEX|$TARPROC_SOURCE"; stat -c %a .',
                    tmpdir=str(base))
    res = r.run(sample(jpeg), 7)
    lines = res.stdout.decode().split("\n")
    assert lines[:5] == ["__key__", "__source__", "sample.cls", "sample.jpg", "sample.json"]
    assert lines[5:9] == ["n01440764_10026", "imagenet_train-0000.tgz",
                          "n01440764_10026|7|imagenet_train-0000.tgz", "700"]
    [out] = res.outputs
    assert out == sample(jpeg)
    r.close()
    assert not base.exists() or os.listdir(base) == []


def test_source_is_dash_without_url(base):
    r = ShellRunner("cat __source__", tmpdir=str(base))
    res = r.run({"__key__": "k", "txt": b"t"})
    assert res.stdout == b"-"
    assert "__url__" not in res.outputs[0]


def test_rename_and_convert_real_jpeg(base, jpeg):
    r = ShellRunner("echo newkey > __key__; convert sample.jpg sample.ppm; rm sample.jpg",
                    tmpdir=str(base))
    env_path = os.environ["PATH"]
    os.environ["PATH"] = "/usr/bin:" + env_path
    try:
        [out] = r.run(sample(jpeg)).outputs
    finally:
        os.environ["PATH"] = env_path
    assert out["__key__"] == "newkey"
    assert set(out) == {"__key__", "__url__", "cls", "json", "ppm"}
    assert out["ppm"].startswith(b"P6\n32 32\n255\n")
    assert out["ppm"][-3:] == b"\xfe\x00\x00" or out["ppm"][-3:] == b"\xff\x00\x00"


def test_graphicsmagick(base, jpeg):
    if not shutil.which("gm"):
        pytest.skip("no GraphicsMagick")
    r = ShellRunner("gm convert sample.jpg sample.png; rm sample.jpg", tmpdir=str(base))
    [out] = r.run(sample(jpeg)).outputs
    assert out["png"].startswith(b"\x89PNG")


def test_basename(base):
    r = ShellRunner("ls; mv img.txt img.out", basename="img", tmpdir=str(base))
    res = r.run({"__key__": "k", "txt": b"hello"})
    assert res.stdout.decode().split() == ["__key__", "__source__", "img.txt"]
    assert res.outputs == [{"__key__": "k", "out": b"hello"}]


def test_multi_dot_extension_and_other_files_ignored(base):
    r = ShellRunner("cp sample.seg.png sample.x.y; echo junk > other.txt", tmpdir=str(base))
    [out] = r.run({"__key__": "k", "seg.png": b"P"}).outputs
    assert out == {"__key__": "k", "seg.png": b"P", "x.y": b"P"}


def test_subdirs_one_in_many_out(base):
    cmd = ("for i in 1 2 3; do mkdir part$i; echo \"$(cat __key__)-$i\" > part$i/__key__; "
           "echo $i > part$i/sample.txt; done; mkdir empty; mkdir nokey; echo x > nokey/sample.t")
    r = ShellRunner(cmd, subdirs=True, tmpdir=str(base))
    outs = r.run({"__key__": "doc", "__url__": "u", "pdf": b"%PDF"}).outputs
    assert [o["__key__"] for o in outs] == ["doc", "doc-1", "doc-2", "doc-3"]
    assert outs[2] == {"__key__": "doc-2", "__url__": "u", "txt": b"2\n"}
    assert leftovers(base) == []


def test_subdirs_only_children_when_parent_removed(base):
    r = ShellRunner("mkdir a; echo a > a/__key__; mv sample.txt a/; rm -f sample.*",
                    subdirs=True, tmpdir=str(base))
    assert r.run({"__key__": "k", "txt": b"1"}).outputs == [{"__key__": "a", "txt": b"1"}]


def test_dropped_when_all_files_removed(base):
    r = ShellRunner("rm sample.*", tmpdir=str(base))
    res = r.run(sample())
    assert res.outputs == []


def test_add_log(base):
    r = ShellRunner("wc -c < sample.jpg; echo to-stderr >&2", add_log="log", tmpdir=str(base))
    res = r.run(sample(b"12345"))
    assert res.outputs[0]["log"] == b"5\n"
    assert res.stdout == b"5\n" and res.stderr == b"to-stderr\n"


def test_failure_status_and_stderr_tail(base):
    cmd = "for i in $(seq 1 30); do echo line$i >&2; done; echo out; exit 3"
    r = ShellRunner(cmd, tmpdir=str(base))
    with pytest.raises(SampleFailed) as info:
        r.run(sample(key="bad/one"))
    exc = info.value
    assert exc.key == "bad/one" and exc.status == 3
    assert exc.stderr_tail.split("\n") == [f"line{i}" for i in range(21, 31)]
    assert "bad/one" in str(exc) and "3" in str(exc)
    assert exc.stdout == b"out\n"
    assert leftovers(base) == []


def test_killed_by_signal(base):
    r = ShellRunner("kill -9 $$", tmpdir=str(base))
    with pytest.raises(SampleFailed) as info:
        r.run(sample())
    assert info.value.status == -9


def _sleeps_of(marker):
    return [p for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and p.info["cmdline"][:2] == ["sleep", marker]]


def test_timeout_kills_process_group(base):
    marker = "100.123"  # a distinctive duration, to find exactly our sleeps
    r = ShellRunner(f"sleep {marker} & sleep {marker}", timeout=0.5, tmpdir=str(base))
    t0 = time.monotonic()
    with pytest.raises(SampleFailed) as info:
        r.run(sample())
    assert time.monotonic() - t0 < 5
    assert info.value.status == "timeout"
    time.sleep(0.1)
    assert _sleeps_of(marker) == []
    assert leftovers(base) == []


def test_background_processes_killed_after_exit(base):
    marker = "100.456"
    r = ShellRunner(f"sleep {marker} &", tmpdir=str(base))
    r.run(sample())
    time.sleep(0.1)
    assert _sleeps_of(marker) == []


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/x", "a\nb", "a\x00b", ""])
def test_hostile_keys_refused(base, key):
    r = ShellRunner("touch ran", tmpdir=str(base))
    with pytest.raises(UnsafeNameError):
        r.run({"__key__": key, "txt": b"x"})
    assert leftovers(base) == []


@pytest.mark.parametrize("ext", ["a/b", "../x", "x\ny", ".."])
def test_hostile_extensions_refused(base, ext):
    r = ShellRunner("true", tmpdir=str(base))
    with pytest.raises(UnsafeNameError):
        r.run({"__key__": "k", ext: b"x"})


def test_key_never_reaches_command_line(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    key = "$(touch pwned)`touch pwned2`;touch pwned3"
    r = ShellRunner('cat __key__ > sample.k; echo "$TARPROC_KEY" > sample.e; ls', tmpdir=str(base))
    res = r.run({"__key__": key, "txt": b"x"})
    [out] = res.outputs
    assert out["__key__"] == key and out["k"] == key.encode() and out["e"] == key.encode() + b"\n"
    for name in ("pwned", "pwned2", "pwned3"):
        assert not list(tmp_path.rglob(name))
    assert b"pwned" not in res.stdout
    assert not os.path.exists("/pwned") and not os.path.exists(os.path.expanduser("~/pwned"))


def test_unsafe_key_written_by_command(base):
    r = ShellRunner("echo ../../etc/passwd > __key__", tmpdir=str(base))
    with pytest.raises(SampleFailed, match=r"key written by the command '\.\./\.\./etc/passwd' "
                                           r"refused: a '\.\.' component") as info:
        r.run(sample())
    assert info.value.status == "badkey"  # like a key that is not UTF-8: the command's doing
    assert leftovers(base) == []


def test_temp_dirs_cleaned_on_success_and_failure(base):
    r = ShellRunner('mkdir -p deep/er; echo x > deep/er/f; [ "$TARPROC_INDEX" != 3 ]',
                    tmpdir=str(base))
    for i in range(6):
        try:
            r.run(sample(), i)
        except SampleFailed:
            assert i == 3
    assert leftovers(base) == []
    roots = os.listdir(base)
    assert len(roots) == 1 and oct(os.stat(base / roots[0]).st_mode)[-3:] == "700"
    r.close()
    assert os.listdir(base) == []


def test_keep_dirs(base):
    r = ShellRunner("true", keep_dirs=True, tmpdir=str(base))
    r.run(sample())
    kept = [p for p in leftovers(base) if p.endswith("sample.jpg")]
    assert len(kept) == 1
    r.close()  # kept for debugging: also once the run is over
    assert [p for p in leftovers(base) if p.endswith("sample.jpg")] == kept


def test_script_by_shebang_and_interpreter(base, tmp_path):
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/sh\necho from-script; tr a-z A-Z < sample.txt > sample.up\n")
    r = ShellRunner(script=str(script), tmpdir=str(base))
    script.unlink()  # the runner carries the bytes, not the path
    res = pickle.loads(pickle.dumps(r)).run({"__key__": "k", "txt": b"abc"})
    assert res.stdout == b"from-script\n" and res.outputs[0]["up"] == b"ABC"
    py = tmp_path / "s.py"
    py.write_text("import os\nopen('sample.n', 'w').write(os.environ['TARPROC_KEY'])\n")
    r = ShellRunner(script=str(py), interpreter="python3", tmpdir=str(base))
    assert r.run({"__key__": "kk", "txt": b"x"}).outputs[0]["n"] == b"kk"


def test_pickled_runner_works_and_has_no_process_state(base):
    r = ShellRunner("true", tmpdir=str(base))
    r.run(sample())
    clone = pickle.loads(pickle.dumps(r))
    assert clone._local is None
    assert clone.run(sample()).outputs


def test_default_tmpdir_prefers_shm(monkeypatch):
    from tarproc.runner import default_tmpdir
    monkeypatch.delenv("TMPDIR", raising=False)
    d = default_tmpdir()
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        assert d == "/dev/shm"
    assert default_tmpdir(min_free=1 << 62) != "/dev/shm"
    monkeypatch.setenv("TMPDIR", "/somewhere")
    assert default_tmpdir() == "/somewhere"


# ------------------------------------------------------------------------------ Python


SCRIPT = '''
def process_sample(sample):
    kind = sample["txt"].decode()
    print("saw", sample["__key__"])
    if kind == "dict":
        return {"__key__": sample["__key__"], "up": sample["txt"].upper()}
    if kind == "nokey":
        return {"txt": "text is encoded"}
    if kind == "list":
        return [{"__key__": sample["__key__"] + "/" + str(i), "n": str(i)} for i in range(3)]
    if kind == "none":
        return None
    if kind == "int":
        return {"__key__": "k", "cls": 3}
    if kind == "raise":
        raise ValueError("boom")
    if kind == "badkey":
        return {"__key__": "../x", "a": b""}
    if kind == "listnokey":
        return [{"a": b"1"}, {"a": b"2"}]
    if kind == "mutate":
        sample["txt"] = b"changed"
        return sample
    return 42
'''


def run_py(kind):
    r = PythonRunner(SCRIPT, "demo.py")
    return r.run({"__key__": "k1", "__url__": "u", "txt": kind.encode()}, 0)


def test_python_results():
    res = run_py("dict")
    assert res.outputs == [{"__key__": "k1", "up": b"DICT", "__url__": "u"}]
    assert res.stdout == b"saw k1\n"
    assert run_py("nokey").outputs == [{"__key__": "k1", "txt": b"text is encoded", "__url__": "u"}]
    assert [o["__key__"] for o in run_py("list").outputs] == ["k1/0", "k1/1", "k1/2"]
    assert run_py("list").outputs[2]["n"] == b"2"
    assert run_py("none").outputs == []


@pytest.mark.parametrize("kind,words", [
    ("int", ["'cls'", "int"]),
    ("raise", ["ValueError", "boom"]),
    ("listnokey", ["__key__"]),
    ("other", ["int", "expected dict"]),
])
def test_python_failures(kind, words):
    with pytest.raises(SampleFailed) as info:
        run_py(kind)
    assert info.value.key in ("k1", "k")
    for w in words:
        assert w in str(info.value)
    if kind == "raise":
        assert info.value.status == "exception"
        assert "demo.py" in info.value.stderr_tail and "boom" in info.value.stderr_tail


def test_python_unsafe_key():
    with pytest.raises(UnsafeNameError):
        run_py("badkey")


def test_python_input_not_mutated():
    s = {"__key__": "k1", "txt": b"mutate"}
    out = PythonRunner(SCRIPT).run(s).outputs
    assert s["txt"] == b"mutate" and out[0]["txt"] == b"changed"


def test_load_process_sample_errors():
    with pytest.raises(ScriptError, match="bad.py.*syntax error at line 1"):
        load_process_sample("def (:", "bad.py")
    with pytest.raises(ScriptError, match="none.py.*does not define process_sample"):
        load_process_sample("x = 1", "none.py")
    with pytest.raises(ScriptError, match="imp.py.*ZeroDivisionError"):
        load_process_sample("1/0", "imp.py")
    assert load_process_sample("def process_sample(s): return s")({"a": 1}) == {"a": 1}


def test_python_runner_pickles_source_not_function():
    r = PythonRunner(SCRIPT, "demo.py")
    r.load()
    data = pickle.dumps(r)
    assert b"process_sample" in data
    assert pickle.loads(data).run({"__key__": "k", "txt": b"dict"}).outputs[0]["up"] == b"DICT"


def test_normalize_result_carries_url_and_meta():
    out = normalize_result({"__key__": "a", "__extra__": 1, "x": bytearray(b"1")},
                           {"__key__": "k", "__url__": "u"})
    assert out == [{"__key__": "a", "__extra__": 1, "x": b"1", "__url__": "u"}]
    with pytest.raises(SampleFailed):
        normalize_result("nope", {"__key__": "k"})


# ------------------------------------------------------------------ speed paths keep the contract


@pytest.mark.parametrize("cmd", [
    "printf Y | dd of=sample.cls conv=notrunc status=none",  # in place, same size, at once
    "printf 'xy' > sample.cls",  # rewritten
    "mv sample.json sample.cls",  # another file under this name
    "true",  # untouched: the input bytes are reused
])
def test_unchanged_inputs_reused_changed_ones_read(base, cmd):
    r = ShellRunner(cmd, tmpdir=str(base))
    s = sample()
    s["cls"] = b"X"
    out = r.run(s).outputs[0]
    expected = {"printf Y | dd of=sample.cls conv=notrunc status=none": b"Y",
                "printf 'xy' > sample.cls": b"xy", "mv sample.json sample.cls": b'{"a": 1}',
                "true": b"X"}[cmd]
    assert out["cls"] == expected
    assert out["jpg"] == s["jpg"]
    if cmd == "true":
        assert out["jpg"] is s["jpg"]
    r.close()


def test_collect_false_counts_without_reading(base):
    r = ShellRunner("rm sample.json; echo hi > sample.txt; mkdir d; echo k2 > d/__key__; "
                    "echo x > d/sample.y", tmpdir=str(base), subdirs=True, collect=False,
                    add_log="log")
    outs = r.run(sample()).outputs
    assert outs == [{"__key__": "n01440764_10026", "__url__": "imagenet_train-0000.tgz",
                     "cls": None, "jpg": None, "txt": None, "log": None},
                    {"__key__": "k2", "__url__": "imagenet_train-0000.tgz", "y": None}]
    r.close()
    assert leftovers(base) == []


@pytest.mark.parametrize("cmd", ["env", "ls -a", "cat __key__ sample.cls"])
def test_plain_command_without_bash_is_the_same(base, cmd):
    """A plain command is run without bash in between: same output, same variables as bash -c."""
    fast = ShellRunner(cmd, tmpdir=str(base))
    slow = ShellRunner(cmd, tmpdir=str(base))
    assert fast._state().direct is not None
    slow._state().direct = None
    a, b = fast.run(sample()).stdout, slow.run(sample()).stdout
    if cmd == "env":  # PWD differs by the temp dir's name only
        a, b = ({l for l in x.decode().splitlines() if not l.startswith("PWD=")} for x in (a, b))
    assert a == b
    fast.close()
    slow.close()


@pytest.mark.parametrize("cmd", ["true", "echo a", "ls *", "x=1 env", "cat sample.cls; echo",
                                 "ls ~", "echo $HOME", "cat 'sample.cls'", "ls {a,b}"])
def test_shell_syntax_still_goes_to_bash(base, cmd):
    r = ShellRunner(cmd, tmpdir=str(base))
    assert r._state().direct is None
    r.close()


def test_direct_exec_failure_falls_back_to_bash(base, tmp_path):
    script = tmp_path / "noshebang"
    script.write_text("echo from-bash\n")
    script.chmod(0o755)
    r = ShellRunner(str(script), tmpdir=str(base))
    assert r._state().direct is not None
    assert r.run(sample()).stdout == b"from-bash\n"
    r.close()


# ------------------------------------------------------------------ reused dirs look fresh

TAMPER = r'''
echo "== $(basename "$PWD") $(stat -c %a .)"
for f in * .[!.]*; do [ -e "$f" ] || [ -L "$f" ] || continue; echo "$f $(stat -c '%F %a %h' "$f")"; done
cat sample.txt; echo
case $((TARPROC_INDEX % 7)) in
 0) ln sample.txt "$OUT/hard.txt"; chmod 777 .; echo junk > extra; mkdir sub; echo x > sub/f ;;
 1) chmod 600 sample.txt; rm sample.cls; ln -s "$OUT/orig.txt" sample.cls; mkfifo fifo ;;
 2) rm sample.txt; echo new > sample.txt; chmod +x sample.cls; touch .hidden ;;
 3) d=$PWD; cd ..; mv "$d" "$d.moved"; ln -s "$OUT" "$d" ;;
 4) printf 'xyz' > sample.txt; ln sample.cls sample.again ;;
 5) rm -rf "$PWD"/* ;;
esac
'''


@pytest.mark.parametrize("processes", [1, 2])
def test_reused_dirs_look_fresh_to_every_sample(base, tmp_path, monkeypatch, processes):
    """Pool threads reuse their dirs and files; whatever a command did to them, the next sample
    sees a dir with a new name, mode 0700, holding just its own plain files, and nothing outside
    the dir (hard links, symlink targets, a symlink put in place of the dir) is written to."""
    from tarproc.runner import process_samples

    out = tmp_path / "outside"
    out.mkdir()
    (out / "orig.txt").write_text("keep")
    monkeypatch.setenv("OUT", str(out))
    r = ShellRunner(TAMPER, tmpdir=str(base))
    inputs = [{"__key__": f"k{i}", "txt": f"content-{i}".encode(), "cls": b"%d" % i}
              for i in range(14)]
    names = set()
    for o in process_samples(r, inputs, processes=processes):
        i = o.index
        head, *listing, text, _ = o.stdout.decode().split("\n")[:6] + [""]
        name, mode = head.split()[1:]
        assert name not in names and mode == "700"
        names.add(name)
        assert listing == ["__key__ regular file 644 1", "__source__ regular file 644 1",
                           "sample.cls regular file 644 1", "sample.txt regular file 644 1"], i
        assert text == f"content-{i}"
        if i % 7 not in (3, 5):
            expected = {"1": b"keep", "2": b"new\n", "4": b"xyz"}.get(str(i % 7), f"content-{i}".encode())
            assert o.outputs[0]["txt" if i % 7 != 1 else "cls"] == expected
    assert sorted(os.listdir(out)) == ["hard.txt", "orig.txt"]
    assert (out / "hard.txt").read_text() in ("content-0", "content-7")
    assert (out / "orig.txt").read_text() == "keep"
    r.close()
    assert leftovers(base) == []


@pytest.mark.parametrize("collect", [True, False])
def test_dir_read_back_without_listing_only_while_its_entries_are_ours(base, monkeypatch, collect):
    """A sample dir whose entries the command left alone (its mtime is still prepare's mark) is
    read back without listing it; in-place writes to the key or a field still count, and any
    change of entries (or of the dir's mtime) takes the full listing. Over a pool of reused
    workspaces, the outputs are those of the listing alone."""
    from tarproc.runner import process_samples
    from tarproc.runner.sampledir import ShellRunner as SR

    calls = {"fast": 0}
    fast = SR._read_unchanged_dir

    def counted(self, *a):
        calls["fast"] += 1
        return fast(self, *a)

    cmds = {  # command by index % 6, and what its sample must become
        0: "true",
        1: "printf k-new > __key__",  # in place: same inode, the dir unchanged
        2: "printf Y | dd of=sample.cls conv=notrunc status=none",  # in place, same size
        3: "touch .",  # the dir's mtime moves, no entry changes
        4: "echo hi > sample.txt",  # a new entry
        5: "rm sample.json",
    }
    script = "case $((TARPROC_INDEX % 6)) in " + " ".join(
        f"{i}) {c};;" for i, c in cmds.items()) + " esac"
    inputs = [{"__key__": f"k{i}", "cls": b"X", "json": b"{}"} for i in range(24)]

    def expected(i):
        out = {"__key__": f"k{i}", "cls": b"X", "json": b"{}"}
        kind = i % 6
        if kind == 1:
            out["__key__"] = "k-new"
        elif kind == 2:
            out["cls"] = b"Y"
        elif kind == 4:
            out["txt"] = b"hi\n"
        elif kind == 5:
            del out["json"]
        if not collect:
            out = {k: (v if k == "__key__" else None) for k, v in out.items()}
        return out

    results = {}
    for mode in ("listing", "fast"):
        if mode == "fast":
            monkeypatch.setattr(SR, "_read_unchanged_dir", counted)
        else:  # the listing alone: prepare leaves the dir's mtime unmarked
            monkeypatch.setattr(SR, "_read_unchanged_dir",
                                lambda self, *a: pytest.fail("listing mode took the fast path"))
            monkeypatch.setattr(os, "utime", _utime_files_only(os.utime))
        r = ShellRunner(script, tmpdir=str(base), collect=collect)
        outs = list(process_samples(r, inputs, processes=2))
        r.close()
        monkeypatch.undo()
        results[mode] = [o.outputs for o in outs]
        assert results[mode] == [[expected(i)] for i in range(24)], mode
    # kinds 0-2 (half the samples) have dirs with unchanged entries
    assert calls["fast"] == 12
    assert leftovers(base) == []


@pytest.mark.parametrize("processes", [1, 2])
def test_a_file_copied_over_another_with_its_times_is_read_back(base, processes):
    """`cp -p` and `touch -r` give a file another's mtime: no file the command wrote (or the
    key) may then pass for one left untouched, whichever of ours its times came from."""
    from tarproc.runner import process_samples

    cmds = {  # command by index % 5, and the fields and key it leaves
        0: ("cp -p sample.a sample.b", {"a": b"AAAA", "b": b"AAAA"}),
        1: ("printf AAAA > sample.b; touch -r sample.a sample.b", {"a": b"AAAA", "b": b"AAAA"}),
        2: ("printf AAAA > sample.b; touch -r . sample.b", {"a": b"AAAA", "b": b"AAAA"}),
        3: ("printf AAAA > sample.b; touch -r __key__ sample.b", {"a": b"AAAA", "b": b"AAAA"}),
        4: ("printf kkkk > __key__; touch -r sample.a __key__", {"a": b"AAAA", "b": b"BBBB"}),
    }
    script = "case $((TARPROC_INDEX % 5)) in " + " ".join(
        f"{i}) {c};;" for i, (c, _) in cmds.items()) + " esac"
    r = ShellRunner(script, tmpdir=str(base))
    inputs = [{"__key__": f"k{i}", "a": b"AAAA", "b": b"BBBB"} for i in range(15)]
    for o in process_samples(r, inputs, processes=processes):
        fields = cmds[o.index % 5][1]
        key = "kkkk" if o.index % 5 == 4 else f"k{o.index}"
        assert o.outputs == [{"__key__": key, **fields}], cmds[o.index % 5][0]
    r.close()
    assert leftovers(base) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cmd, message", [
    ("ln -sf /dev/zero __key__", "__key__ as something other than a regular file"),
    ("rm __key__; mkfifo __key__", "__key__ as something other than a regular file"),
    ("rm __key__; mkdir __key__", "__key__ as something other than a regular file"),
    ("head -c 70000 /dev/zero | tr '\\0' k > __key__", "__key__ written by the command is over 65536 bytes"),
])
def test_key_that_cannot_be_read_back_fails_the_sample(base, cmd, message):
    """What the command leaves as __key__ is read back only as a regular file, and only up to a
    size: never a read that blocks on a FIFO or never ends on /dev/zero."""
    r = ShellRunner(cmd, tmpdir=str(base))
    t0 = time.monotonic()
    with pytest.raises(SampleFailed) as info:
        r.run(sample())
    assert time.monotonic() - t0 < 10
    assert message in str(info.value) and info.value.status == "badfile"
    r.close()
    assert leftovers(base) == []


def test_setup_errors_say_what_is_wrong(base, tmp_path):
    """A script whose #! names no interpreter, a temp dir base that is missing or a file, a
    member ending in a dot: one error each that names the culprit, nothing created."""
    from tarproc.errors import TarprocError

    script = tmp_path / "s.sh"
    script.write_text("#!/nonexistent/interp -x\necho hi\n")
    r = ShellRunner(script=str(script), tmpdir=str(base))
    with pytest.raises(TarprocError, match=r"^s.sh: cannot start it with its #! line "
                                           r"'#!/nonexistent/interp -x': No such file"):
        r.run(sample())
    r.close()
    for where, what in ((tmp_path / "no" / "such", "no such directory"), (script, "not a directory")):
        r = ShellRunner("true", tmpdir=str(where))
        with pytest.raises(TarprocError, match=f"temp dir base {where} .*: {what}"):
            r.run(sample())
        r.close()
    assert not (tmp_path / "no").exists()
    r = ShellRunner("true", tmpdir=str(base))
    with pytest.raises(UnsafeNameError, match=r"empty field name in sample 'a': its member 'a\.' ends"):
        r.run({"__key__": "a", "": b"1"})
    r.close()
    assert leftovers(base) == []


def test_dir_removed_while_prepared_fails_the_sample_by_name(base, monkeypatch):
    """Another sample's command may remove the dirs beside its own (`rm -rf ../*`) while this
    one's files are written: a SampleFailed naming the sample, not a bare 'sample.cls: No such
    file' from deep inside."""
    from tarproc.runner import sampledir

    real = sampledir._ProcessState.create_file

    def sabotaged(self, ws, name, data, mark):
        if name == "sample.cls":
            shutil.rmtree(self.root)  # as rm -rf ../* in a command running beside
        return real(self, ws, name, data, mark)

    monkeypatch.setattr(sampledir._ProcessState, "create_file", sabotaged)
    r = ShellRunner("true", tmpdir=str(base))
    with pytest.raises(SampleFailed, match=r"^sample 'k1': cannot write its files into its temp dir "
                                           r"under .*: sample.cls: No such file or directory") as info:
        r.run({"__key__": "k1", "cls": b"1", "txt": b"x"})
    assert info.value.status == "prepare"
    r.close()


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), 1e30])
def test_timeout_out_of_range_is_refused(timeout):
    with pytest.raises(ValueError, match="timeout must be more than 0 and at most 1000000 seconds"):
        ShellRunner("true", timeout=timeout)


def _utime_files_only(utime):
    """os.utime that leaves directories' times alone (so the sample dir is never marked)."""
    import stat as stat_mod

    def wrapped(path, *a, **kw):
        if isinstance(path, int) and stat_mod.S_ISDIR(os.fstat(path).st_mode):
            raise OSError("not marking dirs in this test")
        return utime(path, *a, **kw)

    return wrapped


def test_recycle_keeps_only_the_files_it_wrote(base):
    r = ShellRunner("echo more > sample.out; mkdir d; ln -s sample.txt sample.lnk", tmpdir=str(base))
    job = r.prepare({"__key__": "a", "txt": b"first, longer"}, 0)
    first = job.workdir
    r.launch(job)
    assert r.finish(job).outputs[0]["out"] == b"more\n"
    r.recycle(job)
    kept = os.listdir(r.root)
    assert len(kept) == 1 and sorted(os.listdir(os.path.join(r.root, kept[0]))) == [
        "__key__", "__source__", "sample.txt"]
    job = r.prepare({"__key__": "b", "txt": b"2nd"}, 1)
    assert job.workdir != first and not os.path.exists(first)
    with open(os.path.join(job.workdir, "sample.txt"), "rb") as f:
        assert f.read() == b"2nd"
    r.cleanup(job)
    assert os.listdir(r.root) == []
    r.close()


@pytest.mark.parametrize("budget", [0, 2])
def test_few_open_files_allowed(base, monkeypatch, budget):
    """Files are kept open for reuse only within a budget; beyond it they are written anew."""
    from tarproc.runner import process_samples, sampledir

    monkeypatch.setattr(sampledir, "_open_file_budget", lambda: budget)
    r = ShellRunner("cat sample.a sample.b sample.c", tmpdir=str(base))
    inputs = [{"__key__": f"k{i}", "a": b"%d" % i, "b": b"-", "c": b"%d\n" % (i * i)}
              for i in range(10)]
    outs = list(process_samples(r, inputs, processes=2))
    assert [o.stdout for o in outs] == [b"%d-%d\n" % (i, i * i) for i in range(10)]
    assert r._state().open_files <= budget
    r.close()
    assert leftovers(base) == []


@pytest.mark.parametrize("processes", [1, 2])
def test_without_c_posix_spawn(base, monkeypatch, processes):
    """Where the C library cannot start a command in a given dir, os.posix_spawn from threads
    with a cwd of their own (or subprocess, from the main thread) does the same job."""
    from tarproc.runner import process_samples, sampledir

    monkeypatch.setattr(sampledir._CSpawn, "get", classmethod(lambda cls: None))
    r = ShellRunner('echo "$TARPROC_KEY $TARPROC_INDEX $(cat sample.txt)"; pwd', tmpdir=str(base))
    assert r.run({"__key__": "main", "txt": b"m"}, 9).stdout.startswith(b"main 9 m\n")
    outs = list(process_samples(r, [{"__key__": f"k{i}", "txt": b"t%d" % i} for i in range(6)],
                                processes=processes))
    for i, o in enumerate(outs):
        line, pwd = o.stdout.decode().split("\n")[:2]
        assert line == f"k{i} {i} t{i}" and os.path.dirname(os.path.dirname(pwd)) == str(base)
    r.close()
    assert leftovers(base) == []


def test_plain_command_gets_pwd_of_its_dir(base):
    r = ShellRunner("env", tmpdir=str(base))
    assert r._state().direct is not None
    res = r.run(sample(), 3)
    env = dict(l.split("=", 1) for l in res.stdout.decode().splitlines() if "=" in l)
    assert os.path.dirname(env["PWD"]) == r.root and env["TARPROC_INDEX"] == "3"
    assert env["TARPROC_KEY"] == "n01440764_10026" and env["SHLVL"]
    r.close()
