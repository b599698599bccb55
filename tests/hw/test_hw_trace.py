"""SpAtten workload CSV: the published files read and round-trip; every kind of bad row is one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dynaprune.errors import DynapruneError
from dynaprune.hw.trace import COLUMNS, Trace, TraceRow, read_trace, write_trace

PUBLISHED = {
    "small.csv": 1,
    "summary-gpt2-medium-ptb-per0.csv": 12288,
    "summary-gpt2-medium-wikitext2-per0-hp-step5+dedic+glob_p+local_p+hp+topk+quant.csv": 11328,
    "summary-gpt2-small-wikitext2-per8-step1+dedic.csv": 4608,
    "summary-gpt2-small-wikitext2-per8.csv": 4608,
}
HEADER = ",".join(COLUMNS)
GOOD = "0,0,0,64.0,993,993,6,16,0.05,True,4,204,6,True,False,False,-1"


@pytest.fixture(scope="module")
def workloads(shared_data: Path) -> Path:
    return shared_data / "spatten-workloads"


@pytest.mark.parametrize("name,rows", PUBLISHED.items())
def test_published_traces_read_and_round_trip_byte_for_byte(workloads, tmp_path, name, rows):
    src = workloads / name
    t = read_trace(src)
    assert len(t) == rows
    assert t.config is not None and t.config.startswith("configs/gpt2/")
    out = write_trace(tmp_path / "copy.csv", t)
    again = read_trace(out)
    assert all(np.array_equal(t[c], again[c]) for c in COLUMNS) and again.config == t.config
    if name != "small.csv":  # small.csv has its config line in the middle; the writer puts it last
        assert out.read_bytes() == src.read_bytes()


def test_published_semantics(workloads):
    t = read_trace(workloads / "summary-gpt2-small-wikitext2-per8.csv")
    assert set(np.unique(t["quant_key_bit"])) == {6} and t["if_requant"].sum() == 323
    assert (t["value_fetch_num"] <= t["key_fetch_num"]).all()
    assert (t["topk"][t["if_topk"]] >= 0).all()
    dense = read_trace(workloads / "summary-gpt2-small-wikitext2-per8-step1+dedic.csv")
    assert (dense["quant_key_bit"] == -1).all() and (dense["key_fetch_num"] == dense["sentence_length_L"]).all()


def test_rows_api_round_trip(tmp_path):
    rows = [TraceRow(0, 0, h, 64, 10, 8, value_fetch_num=3, quant_key_bit=4, if_requant=True,
                     auto_requant_incre=4, auto_requant_thres=0.1) for h in range(3)]
    rows.append(TraceRow(0, 0, 3, 64, 10, 10, if_topk=True, topk=7))
    path = write_trace(tmp_path / "own.csv", rows, config="our-run")
    t = read_trace(path)
    assert list(t.rows()) == rows and t.config == "our-run"
    assert TraceRow(0, 0, 0, 64, 10, 8).value_fetch_num == 8  # default: no local value pruning
    assert path.read_text().splitlines()[1].split(",")[3] == "64.0"


def _write(tmp_path: Path, *lines: str, header: str = HEADER) -> Path:
    p = tmp_path / "t.csv"
    p.write_text("\n".join([header, *lines]) + "\n")
    return p


def _with(field: str, value: str) -> str:
    cells = GOOD.split(",")
    cells[COLUMNS.index(field)] = value
    return ",".join(cells)


@pytest.mark.parametrize("line,needle", [
    (_with("key_fetch_num", "abc"), "column 'key_fetch_num': 'abc' is not an integer"),
    (_with("key_fetch_num", "994"), "key_fetch_num 994 > sentence_length_L 993"),
    (_with("key_fetch_num", "-3"), "key_fetch_num must be >= 0"),
    (_with("value_fetch_num", "-1"), "value_fetch_num must be >= 0"),
    (_with("value_fetch_num", "995"), "value_fetch_num 995 > key_fetch_num"),
    (_with("head_id", "1.5"), "column 'head_id': '1.5' is not an integer"),
    (_with("embedding_length_D", "0"), "embedding_length_D must be >= 1"),
    (_with("quant_key_bit", "0"), "quant_key_bit must be -1"),
    (_with("quant_value_bit", "33"), "quant_value_bit must be -1"),
    (_with("if_requant", "maybe"), "column 'if_requant': 'maybe' is not True or False"),
    (_with("auto_requant_thres", "nan"), "column 'auto_requant_thres': 'nan' is not a number (finite)"),
    (_with("auto_requant_thres", "x"), "column 'auto_requant_thres': 'x' is not a number"),
    (_with("auto_requant_thres", "1.5"), "auto_requant_thres must be -1"),
    (_with("if_topk", "True"), "if_topk is True but topk is -1"),
    (_with("topk", "2000"), "topk must be -1 or 0..sentence_length_L"),
    (_with("quant_key_bit", "-1"), "if_requant needs quant_key_bit"),
    ("0,0,0,64.0,993", "expected 17 fields"),
])
def test_bad_rows_name_line_and_column(tmp_path, line, needle):
    p = _write(tmp_path, GOOD, line)
    with pytest.raises(DynapruneError) as e:
        read_trace(p)
    assert needle in str(e.value) and ":3:" in str(e.value)
    assert "is could" not in str(e.value) and "convert string" not in str(e.value)  # plain words, not Python's


def test_a_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(DynapruneError, match="is a folder, expected a file"):
        read_trace(tmp_path)
    with pytest.raises(DynapruneError, match="trace file not found"):
        read_trace(tmp_path / "none.csv")


def test_bad_files(tmp_path):
    with pytest.raises(DynapruneError, match="missing columns: key_fetch_num"):
        read_trace(_write(tmp_path, GOOD, header=HEADER.replace("key_fetch_num", "keys")))
    with pytest.raises(DynapruneError, match="no data rows"):
        read_trace(_write(tmp_path, "configs/x.yml" + "," * 16))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DynapruneError, match="empty file"):
        read_trace(tmp_path / "empty.csv")
    with pytest.raises(DynapruneError, match="not found"):
        read_trace(tmp_path / "nope.csv")


def test_row_and_trace_validation():
    with pytest.raises(DynapruneError, match="key_fetch_num 11 > sentence_length_L 10"):
        TraceRow(0, 0, 0, 64, 10, 11)
    with pytest.raises(DynapruneError, match="must be an integer"):
        TraceRow(0, 0, 0, 64, 10, 5.5)
    t = Trace.from_rows([TraceRow(0, 0, 0, 64, 10, 5)])
    with pytest.raises(DynapruneError, match="trace row 0: key_fetch_num 12 > sentence_length_L 10"):
        t.replace(key_fetch_num=12)
    with pytest.raises(DynapruneError, match="unknown trace column"):
        t.replace(keys=3)
    with pytest.raises(DynapruneError, match="at least one row"):
        Trace.from_rows([])
