"""TSV loaders: each STS format, header detection, path resolution and every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaprune.errors import DynapruneError
from dynaprune.eval.data import LabeledText, STSPair, data_root, load_labeled_text, load_sts, resolve_data_path


def write(tmp_path: Path, text: str, name: str = "f.tsv") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ---- STS formats -------------------------------------------------------------------------------------

def test_glue_stsb_dev(shared_data):
    pairs = load_sts(shared_data / "stsb" / "dev.tsv")
    assert len(pairs) == 1500
    assert pairs[0] == STSPair("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    # QUOTE_NONE: quotes inside sentences stay as they are, no row swallows the next one
    quoted = [p for p in pairs if '"u2"' in p.s2]
    assert quoted and quoted[0].score == 4.2
    assert all(0 <= p.score <= 5 for p in pairs)


GLUE_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
GLUE_ROW = "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA \"quoted\" man.\tA man.\t3.5\n"


def test_glue_with_and_without_header(tmp_path):
    assert load_sts(write(tmp_path, GLUE_HEADER + GLUE_ROW)) == [STSPair('A "quoted" man.', "A man.", 3.5)]
    assert load_sts(write(tmp_path, GLUE_ROW * 2)) == [STSPair('A "quoted" man.', "A man.", 3.5)] * 2


def test_named_header_any_column_order(tmp_path):
    p = write(tmp_path, "score\tsentence2\tsentence1\n1.5\tsecond\tfirst\n")
    assert load_sts(p) == [STSPair("first", "second", 1.5)]


def test_original_sts_benchmark_with_trailing_columns(tmp_path):
    p = write(tmp_path, "main-captions\tMSRvid\t2012test\t0001\t5.000\tA plane is taking off.\t"
                        "An air plane is taking off.\n"
                        "main-news\theadlines\t2013\t0042\t0.4\tOne.\tTwo.\textra-source\tlicense\n")
    assert load_sts(p) == [
        STSPair("A plane is taking off.", "An air plane is taking off.", 5.0),
        STSPair("One.", "Two.", 0.4),
    ]


def test_plain_three_columns_header_optional(tmp_path):
    body = "A cat sits.\tA cat is sitting.\t4.8\nA dog.\tA car.\t0\n"
    expected = [STSPair("A cat sits.", "A cat is sitting.", 4.8), STSPair("A dog.", "A car.", 0.0)]
    assert load_sts(write(tmp_path, body)) == expected
    assert load_sts(write(tmp_path, "s1\ts2\tscore\n" + body)) == expected
    assert load_sts(write(tmp_path, "\n" + body + "\n\n")) == expected  # blank lines are skipped


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(
    st.text(st.characters(blacklist_categories=["Cc", "Cs", "Zl", "Zp"]), min_size=1).map(str.strip)
    .filter(lambda s: s and s.lower() not in {"sentence1", "sentence2"}),
    st.text(st.characters(blacklist_categories=["Cc", "Cs", "Zl", "Zp"]), min_size=1).map(str.strip)
    .filter(lambda s: s and s.lower() not in {"sentence1", "sentence2"}),
    st.floats(-1e6, 1e6, allow_nan=False)), min_size=1, max_size=20))
def test_three_column_roundtrip(tmp_path_factory, rows):
    p = tmp_path_factory.mktemp("rt") / "pairs.tsv"
    p.write_text("".join(f"{a}\t{b}\t{s!r}\n" for a, b, s in rows), encoding="utf-8")
    assert load_sts(p) == [STSPair(a, b, s) for a, b, s in rows]


# ---- STS bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty file"),
        ("\n  \n", "empty file"),
        ("s1\ts2\tscore\n", "only a header"),
        ("a\tb\t1\nc\td\n", "line 2: 2 columns, expected 3"),
        ("a\tb\t1\nc\td\t2\t3\n", "line 2: 4 columns, expected 3"),
        ("a\tb\t1\nc\td\thigh\n", "line 2: score 'high' is not a number"),
        ("a\tb\thigh\n", "line 1: score 'high' is not a number"),
        ("a\tb\t1\nc\td\tnan\n", "line 2: score 'nan' is not a number"),
        ("a\tb\t1\n\t d\t2\n", "line 2: empty sentence"),
        ("just one column\n", "line 1: 1 columns; expected an STS file"),
        (GLUE_HEADER + GLUE_ROW + "1\tx\ty\n", "line 3: 3 columns, expected 10"),
        (GLUE_HEADER.replace("score", "foo"), "no score column"),
        ("g\tf\t2012\t1\t3.0\tone\n", "6 columns; expected"),
        ("g\tf\t2012\t1\t3.0\tone\ttwo\ng\tf\t2012\t2\t1.0\tonly\n", "line 2: 6 columns, expected at least 7"),
    ],
)
def test_sts_bad_input(tmp_path, text, match):
    with pytest.raises(DynapruneError, match=match):
        load_sts(write(tmp_path, text))


def test_missing_dir_and_non_utf8(tmp_path):
    with pytest.raises(DynapruneError, match="no such file"):
        load_sts(tmp_path / "missing.tsv")
    (tmp_path / "latin1.tsv").write_bytes("caf\xe9\tb\t1\n".encode("latin-1"))
    with pytest.raises(DynapruneError, match="not UTF-8"):
        load_sts(tmp_path / "latin1.tsv")


# ---- labeled text ------------------------------------------------------------------------------------

def test_sst2_files(shared_data):
    dev = load_labeled_text(shared_data / "sst2" / "dev.tsv")
    assert len(dev) == 872 and {x.label for x in dev} == {0, 1}
    assert dev[0] == LabeledText("it 's a charming and often affecting journey .", 1)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("sentence\tlabel\ngood\t1\nbad\t0\n", [LabeledText("good", 1), LabeledText("bad", 0)]),
        ("good\t1\nbad\t0\n", [LabeledText("good", 1), LabeledText("bad", 0)]),
        ("review\tsentiment\ngreat\tpos\nawful\tneg\n", [LabeledText("great", "pos"), LabeledText("awful", "neg")]),
        ("great\tpos\nawful\tneg\n", [LabeledText("great", "pos"), LabeledText("awful", "neg")]),
        ("tweet\tpolarity\nnice\t1\nmeh\t0\n", [LabeledText("nice", 1), LabeledText("meh", 0)]),
        ("only one row\t2\n", [LabeledText("only one row", 2)]),
    ],
)
def test_labeled_text_header_detection(tmp_path, text, expected):
    assert load_labeled_text(write(tmp_path, text)) == expected


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty file"),
        ("text\tlabel\n", "only a header"),
        ("good\t1\nbad\n", "line 2: 1 columns, expected 2"),
        ("good\t1\nbad\t0\textra\n", "line 2: 3 columns, expected 2"),
        ("good\t1\n  \t0\n", "line 2: empty text"),
        ("good\t1\nbad\t \n", "line 2: empty label"),
    ],
)
def test_labeled_text_bad_input(tmp_path, text, match):
    with pytest.raises(DynapruneError, match=match):
        load_labeled_text(write(tmp_path, text))


def test_labeled_text_missing(tmp_path):
    with pytest.raises(DynapruneError, match="no such file"):
        load_labeled_text(tmp_path / "nope.tsv")


# ---- path resolution ---------------------------------------------------------------------------------

def test_relative_paths_resolve_under_data_root(tmp_path, monkeypatch, shared_data):
    monkeypatch.delenv("DYNAPRUNE_DATA", raising=False)
    assert data_root().resolve() == shared_data.resolve()
    monkeypatch.chdir(tmp_path)
    assert len(load_sts("stsb/dev.tsv")) == 1500
    (tmp_path / "mine").mkdir()
    write(tmp_path / "mine", "a\tb\t1\nc\td\t2\n", "pairs.tsv")
    monkeypatch.setenv("DYNAPRUNE_DATA", str(tmp_path / "mine"))
    assert data_root() == tmp_path / "mine"
    assert resolve_data_path("pairs.tsv") == tmp_path / "mine" / "pairs.tsv"  # not in cwd: data root
    assert len(load_sts("pairs.tsv")) == 2
    write(tmp_path, "x\ty\t3\n", "pairs.tsv")
    assert resolve_data_path("pairs.tsv") == Path("pairs.tsv")  # the working directory wins


def test_a_folder_is_named_a_folder(tmp_path):
    """Issue 12 item 18: a folder that exists is not "not found"."""
    for load in (load_sts, load_labeled_text):
        with pytest.raises(DynapruneError, match="is a folder, expected a data file"):
            load(tmp_path)
