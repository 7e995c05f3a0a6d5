"""Bad input rows: stop with an error naming file, row and field, or skip and count them."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from training.data.records import RowRef
from training.files import write_text_atomic


class BadRowError(ValueError):
    def __init__(self, where: RowRef, field_name: str, reason: str):
        self.where, self.field_name, self.reason = where, field_name, reason
        super().__init__(f"{where.file}: row {where.row}: field '{field_name}': {reason} "
                         "(pass --skip_bad_rows to skip and count such rows)")


def cut_alike(responses: list[str], ids: list) -> bool:
    """Different responses that became the same tokens (ids: one tensor each), cut at max_seq_len or normalised
    alike by the tokenizer (lowercasing, NFC, unknown characters): a pair no loss can tell apart, so a bad row."""
    return len({tuple(x.tolist()) for x in ids}) < len(set(responses))


def alike_reason(truncated: bool, max_seq_len: int) -> str:
    """The bad-row reason for responses cut_alike found alike."""
    if truncated:
        return f"responses identical once cut at max_seq_len={max_seq_len}"
    return "responses that differ as text tokenise to the same ids (the tokenizer normalises them alike)"


@dataclass
class BadRowReport:
    """Collects skipped rows when skipping is on; raises at once when it is off."""
    skip: bool = False
    skipped: list[dict] = field(default_factory=list)
    cut: list[dict] = field(default_factory=list)  # rows kept with a response cut at max_seq_len
    _items: set = field(default_factory=set, repr=False)

    def bad(self, where: RowRef, field_name: str, reason: str, item: tuple | None = None) -> None:
        """item: (dataset, position) of a row found bad when a dataset encodes it: the next pass or epoch
        over the same item finds it again, and it is counted once."""
        err = BadRowError(where, field_name, reason)
        if not self.skip:
            raise err
        if item is not None:
            if (id(item[0]), item[1]) in self._items:
                return
            self._items.add((id(item[0]), item[1]))
        self.skipped.append({"file": where.file, "row": where.row, "field": field_name, "reason": reason})

    def truncated(self, where: RowRef, item: tuple) -> None:
        """A row kept although a response was cut at max_seq_len (its loss covers the kept tokens):
        counted once per (dataset, position), listed in the report and said when it is written."""
        key = ("cut", id(item[0]), item[1])
        if key not in self._items:
            self._items.add(key)
            self.cut.append({"file": where.file, "row": where.row})

    def merge(self, parts: list[tuple[list, list]]) -> None:
        """Join every rank's (skipped, cut) lists: ranks encode different rows, and rows found bad on
        reading are found by every rank; each row is listed once."""
        def once(rows):
            seen = {}
            for r in rows:
                seen.setdefault(json.dumps(r, sort_keys=True), r)
            return list(seen.values())
        self.skipped = once([r for skipped, _ in parts for r in skipped])
        self.cut = once([r for _, cut in parts for r in cut])

    def counts(self) -> dict[str, int]:
        return dict(Counter(f"{s['field']}: {s['reason'].split(':')[0]}" for s in self.skipped))

    def write(self, out_dir: str | Path, name: str = "bad_rows.json") -> Path:
        path = Path(out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"n_skipped": len(self.skipped), "by_reason": self.counts(),  # a kill mid-
                                            "rows": self.skipped, "n_truncated": len(self.cut),  # write: the old one
                                            "truncated_rows": self.cut}, indent=1))
        if self.skipped:  # nothing is dropped silently
            print(f"skipped {len(self.skipped)} bad rows: see {path}")
        if self.cut:
            print(f"{len(self.cut)} rows kept with a response cut at --max_seq_len (raise it to keep them whole): "
                  f"see {path}")
        return path
