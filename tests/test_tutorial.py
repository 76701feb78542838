"""docs/tutorial.md: every bash block runs, in order, and produces what the text says."""

import json
import re
from collections import Counter
from pathlib import Path

from cli_helpers import sh
from tarproc import iter_samples

TUTORIAL = Path(__file__).parent.parent / "docs" / "tutorial.md"


def blocks():
    return re.findall(r"```bash\n(.*?)```", TUTORIAL.read_text(), re.S)


def test_tutorial_runs_and_its_outputs_hold(workdir):
    # as a user types them: stop at the first failing command (the last of a pipeline counts;
    # `cat x | tarproc --count 1` ends cat with SIGPIPE, as `| head` would)
    script = "set -eu +o pipefail\n" + "\n".join(blocks())
    proc = sh(script, workdir, timeout=600)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err[-3000:]
    d = workdir
    first = list(iter_samples(str(d / "data/imagenet_train-0000.tgz")))
    # 2: listing and htls
    assert "8 shards, 0 missing" in out
    # 3: ls of one sample and three keys
    assert "__key__\n__source__\nsample.cls\nsample.jpg\nsample.json\n" in out
    assert "\n".join(s["__key__"] for s in first[:3]) in out
    ppm = list(iter_samples(str(d / "ppm-0000.tar")))
    assert [s["__key__"] for s in ppm] == [s["__key__"] for s in first]
    assert all(s["ppm"].startswith(b"P6") and s["cls"] == f["cls"] for s, f in zip(ppm, first))
    small = list(iter_samples(str(d / "small.tar.zst")))
    assert len(small) == 80 and all(s["png"].startswith(b"\x89PNG") for s in small)
    # 4 and 5: the Python mapper, locally and on Dask
    want = [s for s in first if json.loads(s["json"])["cls"] < 5]
    got = list(iter_samples(str(d / "first-classes.tar")))
    assert [s["__key__"] for s in got] == [s["__key__"] for s in want]
    assert all(g["synset.txt"] == json.loads(w["json"])["synset"].encode() for g, w in zip(got, want))
    assert list(iter_samples(str(d / "mapped/train-0.tar"))) == [dict(s, __url__=str(d / "mapped/train-0.tar")) for s in got]
    assert sum(1 for _ in iter_samples(str(d / "png/train-@8.tar"))) == 160
    # 6: class counts equal a Counter over all shards
    all_samples = list(iter_samples(str(d / "data/imagenet_train-@0008.tgz")))
    counts = Counter(s["cls"].decode() for s in all_samples)
    for value, n in counts.items():
        assert f"{n}\t{value}\n" in out
    # 7: a shuffle keeps every sample once
    shuffled = list(iter_samples(str(d / "shuffled/train-@4.tgz")))
    assert sorted(s["__key__"] for s in shuffled) == sorted(s["__key__"] for s in all_samples)
    assert [s["__key__"] for s in shuffled] != [s["__key__"] for s in all_samples]
    # 8: word counts equal a Counter
    words = Counter(w for s in iter_samples(str(d / "words/words-@4.tar")) for w in s["txt"].decode().split())
    got = {s["txt"].decode(): int(s["count"]) for s in iter_samples(str(d / "counts/counts-@2.tar"))}
    assert got == dict(words)
    # 9: the uploaded dataset holds shard 1's samples, each once
    uploaded = list(iter_samples(str(d / "dataset/ds-@4.tar")))
    assert sorted(s["__key__"] for s in uploaded) == sorted(s["__key__"] for s in
                                                              iter_samples(str(d / "data/imagenet_train-0001.tgz")))
    manifest = json.loads((d / "dataset/manifest.json").read_text())
    assert sum(s["count"] for s in manifest["shards"]) == 20
    # 10: Python
    assert "samples in two shards: 40" in out
    assert "8 shards: 8 done, 0 skipped, 0 failed" in out
