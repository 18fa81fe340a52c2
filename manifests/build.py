"""Build a Parquet manifest from a JSON Lines (or CSV) source, keeping columns as they are.

python manifests/build.py manifests/demo.jsonl manifests/demo.parquet
"""

import sys

import pyarrow.csv
import pyarrow.json
import pyarrow.parquet as pq


def main(source: str, target: str) -> None:
    table = pyarrow.csv.read_csv(source) if source.endswith(".csv") else pyarrow.json.read_json(source)
    pq.write_table(table, target)
    print(f"{target}: {table.num_rows} rows, columns {', '.join(table.column_names)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
