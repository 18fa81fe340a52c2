"""Curation on the embedded model, with planted duplicates, read by the world's judge.

A job (the embedded model, --embeddings) over prompts of the shapes world, each with several images (other
seeds: the model's own near-duplicates), and copies of some rows under other ids with the same prompt and
seed (exact duplicates: the same bytes). Then:
- every pair of images, its cosine similarity and whether the world's judge reads the two as the same
  colour, shape, size and position: the highest similarity of a pair the judge reads as different is the
  lowest safe --near-duplicate;
- curate at each threshold of a sweep: the near-duplicates it marks, how many of them the judge reads as
  different (must be 0 at the default), and that every planted exact duplicate is found.

    .venv/bin/python benchmarks/curate_planted.py --rows 40 --images 4 --copies 10 --folder /tmp/planted
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from unclip_batch.config import JobConfig
from unclip_batch.curation import NEAR_DUPLICATE, CurateConfig, curate
from unclip_batch.job import run_job

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # unclip_lab, the model lab, lives beside the package
from unclip_lab import world  # noqa: E402
from unclip_lab.evaluate import generate_cases  # noqa: E402

ATTRIBUTES = ("colour", "shape", "size", "position")
SWEEP = (0.9, 0.95, 0.97, 0.99, NEAR_DUPLICATE, 0.998)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--prompt-seed", type=int, default=77, help="which of the world's prompts")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/planted"))
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)  # a rerun resumes the job (and redoes the curations)
    rows = [
        {"id": f"p{i:03d}", "prompt": prompt, "num_images": args.images, "seed": 1000 + i}
        for i, (prompt, _) in enumerate(generate_cases(args.rows, seed=args.prompt_seed))
    ]
    copies = [{**row, "id": f"{row['id']}-copy"} for row in rows[: args.copies]]
    pq.write_table(pa.Table.from_pylist(rows + copies), args.folder / "m.parquet")
    output = args.folder / "out"
    run_job(JobConfig(manifests=(str(args.folder / "m.parquet"),), output=str(output), embeddings=True))

    metadata = pq.read_table(output / "metadata").to_pylist()
    keys = [m["image_key"] for m in metadata]
    verdicts = {m["image_key"]: _judged(output / m["image_key"]) for m in metadata}
    vectors = np.array([m["embedding"] for m in metadata], np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    similar = vectors @ vectors.T
    same = np.array([[verdicts[a] == verdicts[b] for b in keys] for a in keys])
    upper = np.triu_indices(len(keys), 1)
    identical = np.array([[m["sha256"] == n["sha256"] for n in metadata] for m in metadata])[upper]
    pairs_same, pairs_different = similar[upper][same[upper] & ~identical], similar[upper][~same[upper]]
    report = {
        "images": len(keys),
        "judged_pairs": {"same": int(len(pairs_same)), "different": int(len(pairs_different))},
        "highest_similarity_of_a_pair_judged_different": round(float(pairs_different.max()), 4),
        "pairs_judged_same_at_or_above": {str(t): int((pairs_same >= t).sum()) for t in SWEEP},
        "pairs_judged_different_at_or_above": {str(t): int((pairs_different >= t).sum()) for t in SWEEP},
        "curate": {},
    }
    planted = {(c["id"], k) for c in copies for k in range(args.images)}
    for threshold in SWEEP:
        summary = curate(CurateConfig(output=str(output), near_duplicate=threshold))
        records = pq.read_table(output / "curation" / "records").to_pylist()
        exact = {(r["id"], r["k"]) for r in records if r["reason"] == "exact_duplicate"}
        found = all(((i, k) in exact) != ((i.removesuffix("-copy"), k) in exact) for i, k in planted)
        near = [r for r in records if r["reason"] == "near_duplicate"]
        wrong = [r for r in near if verdicts[r["image_key"]] != verdicts[r["duplicate_of"]]]
        report["curate"][str(threshold)] = {
            "by_reason": summary["by_reason"],
            "every_planted_exact_duplicate_found": found,
            "near_duplicates_judged_different": len(wrong),
            "near_duplicates_judged_same": len(near) - len(wrong),
            "wrong_examples": [(r["image_key"], r["duplicate_of"], r["similarity"]) for r in wrong[:3]],
            "diversity": summary["diversity"],
        }
    print(json.dumps(report, indent=2))


def _judged(path: Path) -> tuple:
    judgement = world.judge(np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB")))
    return tuple(getattr(judgement, a) for a in ATTRIBUTES)


if __name__ == "__main__":
    main()
