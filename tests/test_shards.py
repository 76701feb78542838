"""Shard patterns: brace ranges, @N, globs and their errors."""

import pytest

from tarproc import shards
from tarproc.errors import PatternError


def test_brace_range_keeps_zero_padding():
    names = shards.expand("imagenet_train-{0000..0147}.tgz")
    assert len(names) == 148
    assert names[0] == "imagenet_train-0000.tgz"
    assert names[-1] == "imagenet_train-0147.tgz"


def test_brace_list_and_product_in_any_scheme():
    assert shards.expand("s3://b/{a,b}-{0..1}.tar") == [
        "s3://b/a-0.tar", "s3://b/a-1.tar", "s3://b/b-0.tar", "s3://b/b-1.tar"]


@pytest.mark.parametrize("pattern,n,first,last", [
    ("Volume_@1000.tgz", 1000, "Volume_0000.tgz", "Volume_0999.tgz"),
    ("imagenet_train-@0148.tgz", 148, "imagenet_train-0000.tgz", "imagenet_train-0147.tgz"),
    ("shard-@000123.tar", 123, "shard-000000.tar", "shard-000122.tar"),
    ("x-@16.tar", 16, "x-00.tar", "x-15.tar"),
    ("http://127.0.0.1:8080/Volume_@16.tgz", 16, "http://127.0.0.1:8080/Volume_00.tgz",
     "http://127.0.0.1:8080/Volume_15.tgz"),
])
def test_at_notation(pattern, n, first, last):
    names = shards.expand(pattern)
    assert (len(names), names[0], names[-1]) == (n, first, last)


def test_at_only_in_last_component_and_last_one_wins():
    assert shards.expand("http://user@host/data/x.tar") == ["http://user@host/data/x.tar"]
    assert shards.expand("http://u@h/d@3/a@2b@3.tar") == [
        "http://u@h/d@3/a@2b0.tar", "http://u@h/d@3/a@2b1.tar", "http://u@h/d@3/a@2b2.tar"]


def test_bad_braces_and_zero_shards_are_errors():
    with pytest.raises(PatternError, match="cannot expand"):
        shards.expand("x-{abc}.tar")
    with pytest.raises(PatternError, match="zero shards"):
        shards.expand("x-@0.tar")


def test_local_glob(tmp_path):
    for i in range(3):
        (tmp_path / f"s-{i}.tar").write_bytes(b"")
    (tmp_path / "other.txt").write_bytes(b"")
    got = shards.expand_inputs(str(tmp_path / "s-*.tar"))
    assert got == [str(tmp_path / f"s-{i}.tar") for i in range(3)]


def test_glob_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(PatternError, match="no file matches"):
        shards.expand_inputs(str(tmp_path / "nothing-*.tar"))


def test_stdin_and_pipe_pass_through():
    assert shards.expand_inputs(["-", "pipe:cat a*.tar"]) == ["-", "pipe:cat a*.tar"]


def test_outputs_must_match_count():
    assert len(shards.expand_outputs("out-@8.tar", 8)) == 8
    with pytest.raises(PatternError, match="names 8 output shard"):
        shards.expand_outputs("out-@8.tar", 16)


def test_printf_outputs():
    assert shards.is_printf("out/ds-%06d.tar")
    assert shards.printf_name("out/ds-%06d.tar", 12) == "out/ds-000012.tar"
    assert not shards.is_printf("out/ds-@4.tar")


def test_existing_file_with_pattern_characters_is_taken_as_it_is(tmp_path):
    for name in ("c@2.tgz", "b{1}.tgz", "a[x].tgz"):
        (tmp_path / name).write_bytes(b"x")
        assert shards.expand_inputs(str(tmp_path / name)) == [str(tmp_path / name)]
        assert shards.expand_inputs(f"file://{tmp_path / name}") == [f"file://{tmp_path / name}"]
    # without such a file, the pattern is a pattern as before
    assert shards.expand_inputs(str(tmp_path / "d@2.tgz")) == [str(tmp_path / "d0.tgz"), str(tmp_path / "d1.tgz")]
    with pytest.raises(PatternError):
        shards.expand_inputs(str(tmp_path / "e{1}.tgz"))
    assert shards.expand_inputs("http://h/c@2.tgz") == ["http://h/c0.tgz", "http://h/c1.tgz"]
