"""Finding and reading the dataset's files: which files hold a split, their problems named by file and
line, the split's rows (with its slice) as one `datasets.Dataset`, and where each row comes from
(RowOrigins: a bad row's error names its file and line, not its index in the split).

json, jsonl, parquet, csv, arrow, a `save_to_disk` folder, a Hub snapshot (`data/train-*.parquet`; the split
comes from the file or folder name) or one data file; `dataset_source` names the type when the extensions do
not (text, xml). `dataset_split` picks the split (`train`) and slices it (`train[:10%]`).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from pkg.trainer.config import split_spec
from pkg.trainer.errors import RowError, TrainerError, first_line

log = logging.getLogger(__name__)

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
# Types read only when `dataset_source` names them: a folder's README.txt is not training data by default.
SOURCE_ONLY = {".txt": "text", ".text": "text", ".xml": "xml"}
SPLITS = ("train", "validation", "valid", "test", "dev", "eval")


def split_of(rel: Path) -> str | None:
    """The split of a file from its name (train-00000-of-00001.parquet, train.jsonl, train/x.arrow)."""
    for part in [*rel.parent.parts, rel.name]:
        match = re.match(r"^([a-z]+)(?:[-_.].*)?$", part.lower())
        if match and match.group(1) in SPLITS:
            return match.group(1)
    return None


def _builder(path: Path, source: str) -> str | None:
    """The `datasets` builder of a data file, or None when it is not one of `source`'s files."""
    builder = BUILDERS.get(path.suffix.lower()) or SOURCE_ONLY.get(path.suffix.lower())
    if source == "auto":
        return BUILDERS.get(path.suffix.lower())
    return builder if builder == source else None


def find_split_files(dataset_dir: Path, split: str = "train", source: str = "auto") -> list[tuple[str, Path]]:
    """(`datasets` builder, file) of every data file of one split; files named for no split count as train.

    Every file of the split is used (whatever its name or type); files of other splits are named in the log.
    """
    visible = sorted(
        p
        for p in dataset_dir.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(dataset_dir).parts)
        and p.name not in ("dataset_info.json", "state.json", "dataset_dict.json")
    )
    files = [p for p in visible if _builder(p, source)]
    if ignored := [str(p.relative_to(dataset_dir)) for p in visible if not _builder(p, source)]:
        log.info("not read (not a data file for dataset_source %s): %s", source, _some(ignored))
    if not files:
        kinds = "json, jsonl, parquet, csv, arrow files or a save_to_disk folder"
        raise TrainerError(
            f"no data files in {dataset_dir}: expected {kinds if source == 'auto' else source + ' files'}"
        )
    by_split = {p: split_of(p.relative_to(dataset_dir)) or "train" for p in files}
    chosen = [p for p, s in by_split.items() if s == split]
    if not chosen:
        found = sorted(set(by_split.values()))
        raise TrainerError(f"no {split} split in {dataset_dir}: found only {', '.join(found)}")
    others = [f"{p.relative_to(dataset_dir)} ({s})" for p, s in by_split.items() if s != split]
    if others:
        log.info("not used (another split than %s): %s", split, _some(others))
    return [(_builder(p, source), p) for p in chosen]  # type: ignore[misc]


def _some(names: list[str], limit: int = 20) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_text(path: Path) -> bool:
    """Refuse a text data file (json, jsonl, csv) that is not UTF-8, naming its line; whether it holds more
    than whitespace (read a block at a time: a large file is never whole in memory here)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines, blank = 0, 1, True
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            blank = blank and not block.strip()
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                line = lines + block[: exc.start].count(b"\n")
                raise TrainerError(
                    f"{path} line {line}: bytes that are not UTF-8 (at byte {offset + exc.start}): "
                    "save the file as UTF-8"
                ) from None
            offset, lines = offset + len(block), lines + block.count(b"\n")
    return not blank


def _json_problem(path: Path) -> str | None:
    """Where a JSON or JSON Lines file stops being valid (its first bad line), or None."""
    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
        return None
    except ValueError:
        pass
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except ValueError as exc:
                return f"line {i} is not valid JSON ({exc})"
    return None


def _load_file(builder: str, path: Path, name: str, cache_dir: str):
    """One data file as a Dataset; its problems named by file (and line, for JSON)."""
    import datasets

    options: dict = {}
    if builder in ("json", "csv", "text") and not check_text(path):
        return None  # empty or blank lines only: no rows (counted as 0 in the log)
    if builder == "json":
        if (ds := _json_lines(path)) is not None:
            return ds
        # Values of several kinds in a column (or not JSON Lines): `datasets` decides a column's type from a
        # file's first 10 MiB and casts the later rows to it (a list after strings became the string
        # '[5]'); read in one piece, a column of mixed values keeps each as written (its Json type) and
        # the row checks refuse a wrong one by its file and line, whatever the file's size.
        options["chunksize"] = max(path.stat().st_size + 1, 10 << 20)
    if builder == "csv":  # CSV is text: every cell as written ('007', 'NA', '5.0'), not pandas' guess
        options.update(features=_csv_columns(path), na_filter=False)
    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its own log of a bad file would precede our one line
    try:
        return datasets.load_dataset(
            builder, data_files={name: [str(path)]}, split=name, cache_dir=cache_dir, **options
        )
    except Exception as exc:  # datasets raises many types for unreadable files
        where = _json_problem(path) if builder == "json" else None
        cause = first_line(exc)
        for inner in (exc.__cause__, exc.__context__):  # DatasetGenerationError hides the reason
            if inner is not None and str(inner).strip():
                cause = first_line(inner)
                break
        raise TrainerError(f"cannot read {path}: {where or cause}: fix or remove that file") from None
    finally:
        quiet.setLevel(level)


def _json_lines(path: Path):
    """A JSON Lines file read by pyarrow in one go, when every column holds one kind of value throughout
    (pyarrow refuses a kind that changes, even blocks apart: a list after strings); else None."""
    import datasets
    import pyarrow as pa
    import pyarrow.json as paj

    try:
        table = paj.read_json(path)
    except (pa.ArrowException, ValueError, TypeError):  # then `datasets`' reader says what it makes of it
        return None
    stat = path.stat()  # named by the file: `datasets` would hash every row (~1 s per 100 MB)
    name = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return datasets.Dataset(table, fingerprint=name)


def _csv_columns(path: Path):
    """Every column of a CSV file as text, named as pandas names them (an empty header 'Unnamed: i', a
    repeated one 'name.1')."""
    import datasets

    with path.open(newline="", encoding="utf-8-sig") as f:
        header = next((record for record in csv.reader(f) if record), [])
    names, seen = [], {}
    for i, name in enumerate(header):
        name = name or f"Unnamed: {i}"
        seen[name] = seen.get(name, -1) + 1
        names.append(f"{name}.{seen[name]}" if seen[name] else name)
    return datasets.Features({name: datasets.Value("string") for name in names})


def _load_files(root: Path, name: str, source: str, cache_dir: str):
    """Every data file of split `name` in `root`, in order, as one Dataset, and their RowOrigins; rows per
    file in the log."""
    import datasets

    parts, counts = [], []
    for builder, path in find_split_files(root, name, source):
        ds = _load_file(builder, path, name, cache_dir)
        counts.append(f"{path.relative_to(root)} {len(ds) if ds is not None else 0}")
        if ds is not None and len(ds):
            parts.append((path, ds, builder))
    log.info("dataset %s, split %s, rows per file: %s", root, name, _some(counts))
    if not parts:
        raise TrainerError(f"the dataset in {root} has no rows (its files are empty)")
    first, ds0, _ = parts[0]
    same = [ds0]
    for path, ds, _ in parts[1:]:
        if set(ds.column_names) != set(ds0.column_names):
            raise TrainerError(
                f"{path} has columns {', '.join(ds.column_names)} but {first} has "
                f"{', '.join(ds0.column_names)}: every data file of a split needs the same columns"
            )
        ds = ds.select_columns(ds0.column_names)
        if ds.features != ds0.features:  # string and large_string, int32 and int64 ... are one type here
            if clash := _kind_clash(ds.features, ds0.features):  # a cast would change values ('[5]')
                raise TrainerError(
                    f"{path}: {clash.format(first=first)}: give a column one kind of value in every file "
                    "of the split"
                )
            try:
                ds = ds.cast(ds0.features)
            except (TypeError, ValueError) as exc:
                raise TrainerError(
                    f"{path}: its columns' types ({dict(ds.features)}) cannot be read as those of {first} "
                    f"({dict(ds0.features)}): {first_line(exc)}"
                ) from None
        same.append(ds)
    origins = RowOrigins(tuple((path, builder, len(ds)) for path, ds, builder in parts))
    return datasets.concatenate_datasets(same), origins


def _kinds(feature) -> object:
    """A column's type as the kinds of value it holds: number for any int or float, string for any
    string, lists and dicts by their items."""
    import datasets

    if isinstance(feature, dict):
        return {key: _kinds(value) for key, value in feature.items()}
    if isinstance(feature, datasets.List | datasets.LargeList):
        return [_kinds(feature.feature)]
    if isinstance(feature, datasets.Value):
        dtype = feature.dtype
        if dtype.startswith(("int", "uint", "float")):
            return "number"
        return {"large_string": "string", "bool": "boolean"}.get(dtype, dtype)
    return type(feature).__name__  # Json: values of several kinds, each as written


def _kind_clash(features, target) -> str:
    """The first column whose values would change kind in a cast of `features` to `target`, as "column
    'output' holds list of number but <target's file> holds string", or "". Allowed: a column of nulls,
    and numbers read as text (as the trainer reads a number in a text field)."""

    def clash(have, want) -> bool:
        if have == want or have == "null" or (have == "number" and want == "string"):
            return False
        if isinstance(have, dict) and isinstance(want, dict):
            return any(clash(v, want[k]) for k, v in have.items() if k in want)
        if isinstance(have, list) and isinstance(want, list):
            return clash(have[0], want[0])
        return True

    for column, feature in features.items():
        have, want = _kinds(feature), _kinds(target[column])
        if clash(have, want):
            return f"column {column!r} holds {_kind_name(have)} but {{first}} holds {_kind_name(want)}"
    return ""


def _kind_name(kinds) -> str:
    if isinstance(kinds, list):
        return f"list of {_kind_name(kinds[0])}"
    if isinstance(kinds, dict):
        return "{" + ", ".join(f"{k}: {_kind_name(v)}" for k, v in kinds.items()) + "}"
    return "values of several kinds" if kinds == "Json" else kinds


def _load(root: Path, name: str, source: str, cache_dir: str):
    """The whole split `name` of a save_to_disk folder, a folder of data files or one data file, and its
    RowOrigins."""
    import datasets

    if root.is_file():
        builder = _builder(root, source) if source != "auto" else BUILDERS.get(root.suffix.lower())
        if builder is None:
            raise TrainerError(f"{root}: unknown data file type; set dataset_source")
        ds = _load_file(builder, root, name, cache_dir)
        if ds is None:
            raise TrainerError(f"the dataset in {root} has no rows (the file is empty)")
        return ds, RowOrigins(((root, builder, len(ds)),))
    if (root / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(root))
        if name not in loaded:
            raise TrainerError(f"{root} has splits {list(loaded)} but no {name!r}")
        return loaded[name], RowOrigins(folder=f"{root} (split {name})")
    if (root / "state.json").exists():
        return datasets.load_from_disk(str(root)), RowOrigins(folder=str(root))
    return _load_files(root, name, source, cache_dir)


def select_slice(ds, name: str, bounds: str | None, spec: str):
    """Rows of `ds` (split `name`) inside a Hugging Face slice such as `[:10%]` or `[100:200]`, and the
    index of the first."""
    import datasets

    if bounds is None:
        return ds, 0
    (part,) = datasets.ReadInstruction.from_spec(name + bounds).to_absolute({name: len(ds)})
    if part.to - part.from_ <= 0:
        raise TrainerError(f"dataset_split {spec} selects no rows of the {len(ds)} in split {name}")
    return ds.select(range(part.from_, part.to)), part.from_


def load_split(dataset_dir: str, cache_dir: str, split: str = "train", source: str = "auto"):
    """The training rows as a `datasets.Dataset`: split `split` (with its slice) of `dataset_dir`; and the
    RowOrigins that name the file and line of each."""
    import datasets

    root = Path(dataset_dir)
    if not root.exists():
        raise TrainerError(f"dataset_dir {root} does not exist")
    name, bounds = split_spec(split)
    datasets.disable_progress_bars()
    try:
        whole, origins = _load(root, name, source, cache_dir)
        ds, start = select_slice(whole, name, bounds, split)
    except TrainerError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable files
        raise TrainerError(f"cannot read the dataset in {root}: {type(exc).__name__}: {exc}") from None
    if len(ds) == 0:
        raise TrainerError(f"the dataset in {root} has no rows")
    return ds, RowOrigins(origins.files, origins.folder, start)


def load_rows(dataset_dir: str, cache_dir: str, split: str = "train", source: str = "auto"):
    """load_split's rows alone."""
    return load_split(dataset_dir, cache_dir, split, source)[0]


# ---------------------------------------------------------------- where a row comes from


@dataclass(frozen=True)
class RowOrigins:
    """Where the rows of a loaded split come from: its data files in order with their row counts (a prefix
    sum maps a row of the split to its file), or the save_to_disk folder; `start`, the slice's first row.
    The line of a row in its file is read only when an error names it."""

    files: tuple[tuple[Path, str, int], ...] = ()  # (file, `datasets` builder, rows)
    folder: str = ""
    start: int = 0

    def name(self, i: int) -> str:
        """Row i of the split as its file and line ("/data/train.jsonl line 12"), or folder and row."""
        k = self.start + i
        for path, builder, rows in self.files:
            if k < rows:
                try:
                    return f"{path} {position(path, builder, k)}"
                except (OSError, ValueError, IndexError):  # changed since it was read: its row number
                    return f"{path} row {k} (from 0)"
            k -= rows
        return f"{self.folder or 'the dataset'} row {k}"

    def error(self, exc: RowError) -> TrainerError:
        """A row's problem with the row named by its file and line."""
        return TrainerError(f"{self.name(exc.row)}{exc.rest}")


def position(path: Path, builder: str, k: int) -> str:
    """Where record k (from 0) of a data file is: the line it starts on in JSON Lines, a JSON array and
    CSV (blank lines skipped, as the readers skip them; the header is line 1), else its row number."""
    if builder == "json":
        text = path.read_text(encoding="utf-8")
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, list):
            return f"line {_array_item_line(text, k)}"
        if doc is None or "\n" not in text.strip():  # JSON Lines (or one record on one line)
            lines = [n for n, line in enumerate(text.splitlines(), 1) if line.strip()]
            return f"line {lines[k]}"
    if builder == "csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader, end = csv.reader(f), 0
            records = []
            for record in reader:  # a record may span lines (quoted newlines): it starts after the last
                if record:
                    records.append(end + 1)
                end = reader.line_num
            return f"line {records[k + 1]}"  # records[0]: the header
    if builder == "text":
        return f"line {k + 1}"
    return f"row {k} (from 0)"  # parquet, arrow: the index pandas and pyarrow show


def _array_item_line(text: str, k: int) -> int:
    """The line on which item k of the JSON array `text` starts."""
    decoder, at = json.JSONDecoder(), text.index("[") + 1
    for _ in range(k + 1):
        while text[at] in " \t\r\n,":
            at += 1
        start = at
        _, at = decoder.raw_decode(text, at)
    return text.count("\n", 0, start) + 1
