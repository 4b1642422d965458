"""The votes as numpy arrays: what every dashboard number is computed from.

    v = VoteArrays.of(votes)     # a pyarrow Table or a pandas DataFrame of votes
    v.choice, v.left, v.annotator, v.pair, v.model_a, v.created_us, v.shared ...

String columns are dictionary-encoded once by Arrow into integer codes (-1 for null or
unknown), each the first time a number asks for it; everything after that is numpy
over whole columns. Used by annotate/stats.py and annotate/agreement.py.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from trainer.store import CHOICES, SIDES

Votes = pa.Table | pd.DataFrame

# Integer codes of the choices, in the order of CHOICES ("a", "b", "tie", "both_bad").
# The codes of `left` use the same numbers for "a" and "b", so that "the chosen side
# was the one on the left" is simply `choice == left`.
A, B, TIE, BOTH_BAD = range(len(CHOICES))
N_CHOICES = len(CHOICES)

# The columns any function here may read; a DataFrame is cut down to these before it
# is handed to Arrow, so that prompts and responses are never copied.
_USED_COLUMNS = (
    "pair_id",
    "prompt_id",
    "annotator",
    "choice",
    "left",
    "model_a",
    "model_b",
    "created_at",
    "gen_params",
    "decision_ms",
)


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den as floats, NaN where den is 0 (a rate over no votes is undefined)."""
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


class VoteArrays:
    """The votes as numpy arrays.

    Categorical columns become integer codes (-1 for null or unknown). Each column is
    converted lazily, so a function that needs only `choice` never encodes `pair_id`,
    and `summary`, which calls many functions, converts each column only once.
    """

    def __init__(self, votes: Votes):
        if isinstance(votes, pd.DataFrame):
            votes = pa.Table.from_pandas(
                votes[[c for c in _USED_COLUMNS if c in votes.columns]], preserve_index=False
            )
        elif not isinstance(votes, pa.Table):
            raise TypeError(
                f"votes must be a pyarrow Table or a pandas DataFrame, not {type(votes).__name__}"
            )
        self.table = votes
        self.n = votes.num_rows

    @classmethod
    def of(cls, votes: Votes | VoteArrays) -> VoteArrays:
        return votes if isinstance(votes, VoteArrays) else cls(votes)

    def has(self, name: str) -> bool:
        return name in self.table.column_names

    def column(self, name: str) -> pa.Array:
        if not self.has(name):
            raise ValueError(
                f"the votes have no column {name!r} (columns: {', '.join(self.table.column_names)})"
            )
        col = self.table.column(name).combine_chunks()
        # pandas 3 strings arrive as large_string, categoricals as dictionaries; one
        # plain type keeps the Arrow kernels below simple.
        if pa.types.is_large_string(col.type) or pa.types.is_dictionary(col.type):
            col = col.cast(pa.string())
        return col

    def _encode(self, arr: pa.Array, sort: bool) -> tuple[np.ndarray, list[str]]:
        """Integer codes and their labels. With `sort`, the labels are in sorted order
        (worth it for the few annotators and models; not for a million pair ids)."""
        encoded = pc.dictionary_encode(arr)
        codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        labels = encoded.dictionary.to_pylist()
        if sort and labels:
            order = sorted(range(len(labels)), key=labels.__getitem__)
            rank = np.empty(len(labels) + 1, dtype=np.int64)
            rank[np.asarray(order)] = np.arange(len(labels))
            rank[-1] = -1  # code -1 (null) indexes the last slot and stays -1
            codes = rank[codes]
            labels = [labels[i] for i in order]
        return codes, labels

    def _fixed_codes(self, name: str, values: tuple[str, ...]) -> np.ndarray:
        """Codes of a column with a fixed vocabulary: the position in `values`, or -1."""
        codes = pc.index_in(self.column(name), value_set=pa.array(values, pa.string()))
        return codes.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int8)

    @cached_property
    def choice(self) -> np.ndarray:
        return self._fixed_codes("choice", CHOICES)

    @cached_property
    def left(self) -> np.ndarray:
        return self._fixed_codes("left", SIDES)

    @cached_property
    def _annotator(self) -> tuple[np.ndarray, list[str]]:
        return self._encode(self.column("annotator"), sort=True)

    @property
    def annotator(self) -> np.ndarray:
        return self._annotator[0]

    @property
    def annotators(self) -> list[str]:
        return self._annotator[1]

    @cached_property
    def _pair(self) -> tuple[np.ndarray, list[str]]:
        return self._encode(self.column("pair_id"), sort=False)

    @property
    def pair(self) -> np.ndarray:
        return self._pair[0]

    @property
    def n_pairs(self) -> int:
        return len(self._pair[1])

    @cached_property
    def _models(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        # Both sides share one dictionary, so a model has the same code on either side.
        both = pa.concat_arrays([self.column("model_a"), self.column("model_b")])
        codes, labels = self._encode(both, sort=True)
        return codes[: self.n], codes[self.n :], labels

    @property
    def model_a(self) -> np.ndarray:
        return self._models[0]

    @property
    def model_b(self) -> np.ndarray:
        return self._models[1]

    @property
    def models(self) -> list[str]:
        return self._models[2]

    @cached_property
    def created_us(self) -> np.ndarray:
        """created_at as integer microseconds since the epoch, UTC.

        A timestamp stores UTC instants whatever its display zone, so the integer value
        is UTC; a zone-less timestamp is taken to be UTC already."""
        col = self.column("created_at")
        if not pa.types.is_timestamp(col.type):
            raise ValueError(f"the votes' created_at must be a timestamp, not {col.type}")
        col = pc.cast(col, pa.timestamp("us", col.type.tz), safe=False)
        return col.cast(pa.int64()).fill_null(np.iinfo(np.int64).min).to_numpy()

    @cached_property
    def shared(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The labels agreement is measured on (see `shared_labels`)."""
        return shared_labels(self)

    @cached_property
    def decision_ms(self) -> np.ndarray:
        """Float milliseconds, NaN where not recorded (or where the column is absent,
        as in imported data)."""
        if not self.has("decision_ms"):
            return np.full(self.n, np.nan)
        return self.column("decision_ms").cast(pa.float64()).to_numpy(zero_copy_only=False)


def shared_labels(v: VoteArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pair, annotator, choice) codes: each annotator's latest vote on each pair,
    for the pairs that two or more annotators labelled. In no particular order.
    """
    idx = np.flatnonzero((v.choice >= 0) & (v.annotator >= 0) & (v.pair >= 0))
    # A pair with a single vote cannot be shared. In a typical store that is most
    # pairs, so dropping them first makes everything below cheaper.
    per_pair = np.bincount(v.pair[idx], minlength=v.n_pairs)
    idx = idx[per_pair[v.pair[idx]] >= 2]

    # Re-votes (one annotator, one pair, several standing votes) are rare, so find
    # them by hashing, which costs no sort, and order only those by time.
    key = v.pair[idx] * max(1, len(v.annotators)) + v.annotator[idx]
    repeated = pd.Series(key).duplicated(keep=False).to_numpy()
    if repeated.any():
        rows, rows_key = idx[repeated], key[repeated]
        # lexsort sorts by the last key first and is stable: within one (pair,
        # annotator) run the votes are in time order, equal times in table order.
        order = np.lexsort((v.created_us[rows], rows_key))
        rows, rows_key = rows[order], rows_key[order]
        last_of_run = np.ones(len(rows), dtype=bool)
        last_of_run[:-1] = rows_key[1:] != rows_key[:-1]
        idx = np.concatenate([idx[~repeated], rows[last_of_run]])

    pair, annotator, choice = v.pair[idx], v.annotator[idx], v.choice[idx]
    # Several votes by one annotator made a pair look shared above; now it may not be.
    per_pair = np.bincount(pair, minlength=v.n_pairs)
    shared = per_pair[pair] >= 2
    return pair[shared], annotator[shared], choice[shared].astype(np.int64)
