"""Row <-> column conversion for the dict batches that flow between stages.

Images travel between stages as raw uint8 bytes (height x width x 3; masks height x width), the
row's own width/height giving the shape: a plain binary column, cheap for Arrow and Ray to move.
"""

from __future__ import annotations

import pickle

import numpy as np

NO_ERROR = ""


def rows_of(batch: dict) -> list[dict]:
    if not batch:
        return []
    columns = {k: v.tolist() if isinstance(v, np.ndarray) and v.dtype != object else list(v) for k, v in batch.items()}
    n = len(next(iter(columns.values())))
    return [{k: values[i] for k, values in columns.items()} for i in range(n)]


def to_batch(rows: list[dict]) -> dict:
    if not rows:
        return {}
    batch = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if isinstance(values[0], (bytes, str)):
            array = np.empty(len(values), dtype=object)
            array[:] = values
            batch[key] = array
        else:
            batch[key] = np.asarray(values)
    return batch


def empty_pixels() -> tuple[bytes, bytes]:
    return b"", b""


def image_of(row: dict, key: str = "pixels") -> np.ndarray:
    return np.frombuffer(row[key], dtype=np.uint8).reshape(int(row["height"]), int(row["width"]), 3)


def mask_of(row: dict) -> np.ndarray:
    return np.frombuffer(row["repaint"], dtype=np.uint8).reshape(int(row["height"]), int(row["width"]))


def mark_error(row: dict, stage: str, code: str, message: str) -> None:
    row["stage"], row["code"], row["message"] = stage, code, message


def pack(batch: dict) -> bytes:
    """A whole model block as one value: pipeline.py moves each block as one Ray Data row."""
    # Not mutated: any protocol gives the same block back (5 only frames large buffers better).
    return pickle.dumps(batch, protocol=5)  # pragma: no mutate


def unpack(payload: bytes) -> dict:
    return pickle.loads(payload)
