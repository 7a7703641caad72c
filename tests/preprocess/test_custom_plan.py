"""tools/shard_csv.py's streamed reading (preprocess.custom_plan, CustomCsvRows): the text and CSV records the
stream reads are those of the line-by-line readers at any block size, and a job of any array gets, shard by shard,
the rows a whole-file reader gets (or the error it names first) over generated CSVs: multi-label, HH:MM:SS, a split
column, class files with unknown labels, bad rows."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preprocess import custom_plan, datasets
from preprocess.class_files import choose_label_type, collect_classes, label_lookup, read_class_file
from preprocess.custom_csv import CustomCsvRows, read_custom_csv
from preprocess.custom_fields import CsvLayout, clip_row, header_columns, split_labels
from preprocess.custom_plan import csv_records
from preprocess.datasets import ClipRow, DatasetError, csv_rows, line_blocks, read_lines
from preprocess.job_state import plan_shards

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write(folder: Path, name: str, data: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def outcome(fn):
    """fn()'s value, or ('error', the first file:line or file its message names)."""
    try:
        return fn()
    except DatasetError as e:
        return ("error", str(e).split(": ")[0])


# Text: lines as read_lines reads them, at any block size.

TEXT_PIECES = ["a", "é", ",", '"', " ", "\t", "\n", "\r\n", "\r", "x,y", '"q,\nr"', "\u2028", "#", "\ufeff"]


@PROPERTY
@given(pieces=st.lists(st.sampled_from(TEXT_PIECES), max_size=40), bom=st.booleans(), block=st.integers(1, 9))
def test_line_blocks_read_the_lines_read_lines_reads(tmp_path, pieces, bom, block):
    path = write(tmp_path, "t.txt", ("\ufeff" if bom else "") + "".join(pieces))
    streamed = [(first + j, line) for first, lines in line_blocks(path, block) for j, line in enumerate(lines)]
    assert streamed == [(n, line.removesuffix("\n")) for n, line in read_lines(path)]


def test_line_blocks_bound_lines_and_refuse_other_encodings(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_LINE_CHARS", 8)
    long_line = write(tmp_path, "long.csv", "a,b\nc,d\n0123456789\n")
    for read in (lambda: list(read_lines(long_line)), lambda: list(line_blocks(long_line, 4))):
        with pytest.raises(DatasetError, match=rf"{long_line}:3: a line of more than 8 characters"):
            read()
    latin = write(tmp_path, "latin.csv", "video,label\na.mp4,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="cannot read it as UTF-8 text"):
        list(line_blocks(latin))


# CSV records: csv_rows' fields and errors, whichever way a block is parsed.

CSV_PIECES = ["a", "b c", ",", ", ", '"', '""', " ", "\n", "\n\n", "  \n", '"x,\ny"', "é"]


@PROPERTY
@given(pieces=st.lists(st.sampled_from(CSV_PIECES), max_size=40), block=st.integers(1, 12))
def test_csv_records_are_csv_rows(tmp_path, monkeypatch, pieces, block):
    monkeypatch.setattr(custom_plan, "BLOCK_BYTES", block)
    path = write(tmp_path, "r.csv", "".join(pieces))

    def records(rows):
        got = []
        try:
            for source, fields in rows:
                got.append((source, [field.strip() for field in fields]))
        except DatasetError as e:
            got.append(("error", str(e)))
        return got

    streamed = ((f"{path}:{line_no}", fields) for line_no, fields in csv_records(path))
    assert records(streamed) == records(csv_rows(path))


# Rows: a job's shards hold what a whole-file reader gives.


def read_whole(path: Path, layout: CsvLayout) -> list[ClipRow]:
    """The split's rows the simple way: every row in memory, each decision made over the whole list (times, video
    and key checked for the split's rows, as documented)."""
    (where, header), *body = list(csv_rows(path))
    columns = header_columns(header, layout, where)
    for source, fields in body:
        if len(fields) != columns.count:
            raise DatasetError(f"{source}: columns")
    if not body:
        raise DatasetError(f"{path}: no rows")
    labels = [split_labels(fields[columns.label], layout.label_separator) for _, fields in body]
    given_classes = read_class_file(layout.classes_file) if layout.classes_file else None
    label_type = choose_label_type(layout.label_type, [x for row in labels for x in row], given_classes)
    classes = given_classes or collect_classes(zip([s for s, _ in body], labels, strict=True), label_type, str(path))
    multi_label = any(len(row) > 1 for row in labels) if layout.multi_label is None else layout.multi_label
    several = next((source for (source, _), x in zip(body, labels, strict=True) if len(x) > 1), None)
    if layout.multi_label is False and several:
        raise DatasetError(f"{several}: several")
    chosen = [(s, f, x) for (s, f), x in zip(body, labels, strict=True) if f[columns.split] == layout.split]
    if not chosen:
        raise DatasetError(f"{path}: no row of the split")
    index_of = label_lookup(classes, label_type)
    rows, keys = [], {}
    for source, fields, row_labels in chosen:
        unknown = [x for x in row_labels if x not in index_of]
        if unknown and not layout.drop_unknown_labels:
            raise DatasetError(f"{source}: unknown")
        if not multi_label and len(unknown) == len(row_labels):
            if unknown:
                continue  # dropped
            raise DatasetError(f"{source}: no label")
        rows.append((source, fields))
    if not rows:
        raise DatasetError(f"{path}: all dropped")
    parsed = [clip_row(s, f, columns, layout, index_of, label_type) for s, f in rows]
    for row in parsed:
        if row.key in keys:
            raise DatasetError(f"{row.source}: key twice")
        keys[row.key] = row.source
    return parsed


def hms(centiseconds: int) -> str:
    seconds, cs = divmod(centiseconds, 100)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}.{cs:02d}"


@st.composite
def collection_csvs(draw) -> str:
    """A CSV `video,start,end,label,split` of a few rows: seconds or HH:MM:SS times, one label a row or 0 to 3
    (sometimes quoted), train or val, blank lines; at most one bad row (a bad time, end before start, a path out of the
    folder, a column too many, an open quote) and sometimes two rows of one key."""
    lines = ["video,start,end,label,split"]
    max_labels = draw(st.sampled_from([1, 3]))  # 1: a single-label collection
    for _ in range(draw(st.integers(1, 12))):
        video = draw(st.sampled_from(["a.mp4", "b.mp4", "sub/c.mp4", "a.b.mp4", "a_b.mp4"]))
        start = draw(st.integers(0, 400_000))
        end = start + draw(st.integers(1, 3000))
        as_hms = draw(st.booleans())
        times = f"{hms(start)},{hms(end)}" if as_hms else f"{start / 100},{end / 100}"
        names = st.sampled_from(["dog", "cat", "bird", " cow "])
        labels = ";".join(draw(st.lists(names, min_size=max_labels % 2, max_size=max_labels)))
        labels = f'"{labels}"' if draw(st.booleans()) else labels
        lines.append(f"{video},{times},{labels},{draw(st.sampled_from(['train', 'train', 'val']))}")
        if draw(st.integers(0, 9)) == 0:
            lines.append(draw(st.sampled_from(["", "   "])))
    bad = draw(
        st.sampled_from(
            [None] * 6
            + ["b.mp4,1:2:3,4,dog,train", "b.mp4,5,4,dog,train", "../x.mp4,1,2,dog,train", "b.mp4,1,2,dog,train,x"]
            + ['b.mp4,1,2,"dog,train', "a.mp4,00:00:00.00,1,dog,train\na.mp4,0,2,cat,train"]
        )
    )
    if bad is not None:
        lines.insert(draw(st.integers(1, len(lines))), bad)
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\r\n"]))


@PROPERTY
@given(
    text=collection_csvs(),
    classes=st.sampled_from([None, "dog\ncat\nbird\ncow\n", "dog\ncat\n"]),
    drop=st.booleans(),
    multi_label=st.sampled_from([None, True, False]),
    num_jobs=st.integers(1, 4),
    block=st.sampled_from([7, 64, 1 << 20]),
)
def test_each_jobs_shards_hold_the_rows_the_whole_file_reader_gives(
    tmp_path, monkeypatch, text, classes, drop, multi_label, num_jobs, block
):
    monkeypatch.setattr(custom_plan, "BLOCK_BYTES", block)
    path = write(tmp_path, "clips.csv", text)
    class_file = write(tmp_path, "classes.txt", classes) if classes else None
    layout = CsvLayout(split="train", classes_file=class_file, drop_unknown_labels=drop, multi_label=multi_label)
    whole = outcome(lambda: read_whole(path, layout))
    assert outcome(lambda: read_custom_csv(path, layout).rows) == whole  # one job: the whole split
    if isinstance(whole, tuple):
        return
    streamed = CustomCsvRows(path, layout)
    assert streamed.num_rows == len(whole)
    plan = plan_shards(len(whole), 3, seed=0)
    for job in range(num_jobs):
        shards = plan[job::num_jobs]
        rows = streamed.select(np.concatenate(shards) if shards else np.zeros(0, np.int64))
        assert len(rows) == sum(shard.size for shard in shards)
        for shard in shards:  # shard by shard, the same rows in the same order
            assert [rows[int(i)] for i in shard] == [whole[int(i)] for i in shard]


def test_a_bad_row_stops_only_the_job_whose_shards_hold_it(tmp_path):
    rows = [f"v{i}.mp4,{i},{i + 1},dog" for i in range(12)]
    rows[7] = "v7.mp4,7,oops,dog"
    path = write(tmp_path, "clips.csv", "video,start,end,label\n" + "\n".join(rows) + "\n")
    streamed = CustomCsvRows(path, CsvLayout())  # the plan reads labels and splits, not times
    plan = plan_shards(streamed.num_rows, 2, seed=0)
    holder = next(k for k, shard in enumerate(plan) if 7 in shard) % 3
    for job in range(3):
        mine = np.concatenate(plan[job::3])
        if job == holder:
            with pytest.raises(DatasetError, match=rf"{path}:9: end 'oops' is not a time"):
                streamed.select(mine)
        else:
            assert sorted(streamed.select(mine)) == sorted(mine.tolist())


def test_identity_is_the_csv_sha256_and_limit_keeps_the_first_rows(tmp_path):
    text = "video,label,split\na.mp4,dog,train\nb.mp4,cat,val\nc.mp4,cat,train\nd.mp4,dog,train\n"
    path = write(tmp_path, "clips.csv", text)
    streamed = CustomCsvRows(path, CsvLayout(split="train"), limit=2)
    assert streamed.identity() == {"num_rows": 2, "csv_sha256": hashlib.sha256(text.encode()).hexdigest()}
    assert [row.key for row in streamed.select(np.arange(2)).values()] == ["a_0", "c_0"]
    assert streamed.plan.describe(3).startswith("3 rows of split train (4 in the CSV); 2 classes collected")
    with pytest.raises(IndexError):
        streamed.select(np.array([2]))


def test_label_and_split_cells_past_the_cache_are_read_the_same(tmp_path, monkeypatch):
    text = "video,label,split\n" + "".join(f"v{i}.mp4,c{i % 7};c{i % 5},s{i % 3}\n" for i in range(60))
    path = write(tmp_path, "clips.csv", text)
    cached = read_custom_csv(path, CsvLayout(split="s1"))
    monkeypatch.setattr(custom_plan, "CELLS_CACHED", 2)
    uncached = read_custom_csv(path, CsvLayout(split="s1"))
    assert uncached.rows == cached.rows and uncached.classes == cached.classes and len(cached.rows) == 20
    with pytest.raises(DatasetError, match=r"holds \['s0', 's1'\]"):  # the split values remembered, not all
        read_custom_csv(path, CsvLayout(split="s9"))
