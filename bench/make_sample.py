"""Regenerate data/sample/ from the shared data sets (../shared/data beside the project).

    python bench/make_sample.py [--source ../shared/data] [--patients 100]

Synthea: the first N patients in patients.csv order and every event row of theirs, from all six
files, with the original header and row order (rows are copied byte for byte: the csv module
round-trips these files exactly). PubMed: the first M queries, their target rows from
search_corpus_extra.csv, and distractor rows from abstracts.csv, so semantic search over the
sample has known answers. Running it twice gives identical files.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = PROJECT_ROOT.parent / "shared" / "data"
OUT = PROJECT_ROOT / "data" / "sample"

SYNTHEA_FILES = ("patients", "conditions", "medications", "allergies", "careplans",
                 "immunizations")
N_PATIENTS = 100
N_QUERIES = 50
# Distractors keep both text styles of abstracts.csv: PubMedQA prose (rows 1-500) and
# tokenised EBM-NLP RCT abstracts (rows 501 on).
PUBMEDQA_DISTRACTORS = 100
EBM_NLP_DISTRACTORS = 50
PUBMEDQA_ROWS = 500


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *rows])


def make_synthea(source: Path, out: Path, n_patients: int) -> dict[str, int]:
    header, patients = read_rows(source / "patients.csv")
    chosen = patients[:n_patients]
    ids = {row[header.index("Id")] for row in chosen}
    deceased = sum(1 for row in chosen if row[header.index("DEATHDATE")])
    write_rows(out / "patients.csv", header, chosen)
    counts = {"patients": len(chosen)}
    with_rows: dict[str, set[str]] = {}
    for name in SYNTHEA_FILES[1:]:
        header, rows = read_rows(source / f"{name}.csv")
        col = header.index("PATIENT")
        kept = [row for row in rows if row[col] in ids]
        write_rows(out / f"{name}.csv", header, kept)
        counts[name] = len(kept)
        with_rows[name] = {row[col] for row in kept}
    # The tests and the demo rely on these cases being present; fail here, not there.
    checks = {"deceased": deceased, "with allergies": len(with_rows["allergies"]),
              "without medications": len(ids - with_rows["medications"])}
    for what, n in checks.items():
        if n == 0:
            sys.exit(f"the first {n_patients} patients include none {what}; pick more patients")
    print("synthea:", ", ".join(f"{k} {v}" for k, v in {**counts, **checks}.items()))
    return counts


def make_pubmed(source: Path, out: Path, n_queries: int) -> None:
    q_header, queries = read_rows(source / "queries.csv")
    queries = queries[:n_queries]
    pmids = {row[q_header.index("pmid")] for row in queries}
    header, extra = read_rows(source / "search_corpus_extra.csv")
    targets = [row for row in extra if row[0] in pmids]
    _, abstracts = read_rows(source / "abstracts.csv")
    distractors = (abstracts[:PUBMEDQA_DISTRACTORS]
                   + abstracts[PUBMEDQA_ROWS:PUBMEDQA_ROWS + EBM_NLP_DISTRACTORS])
    if len(targets) != len(queries):
        sys.exit(f"found {len(targets)} target rows for {len(queries)} queries")
    write_rows(out / "abstracts.csv", header, distractors + targets)
    write_rows(out / "queries.csv", q_header, queries)
    print(f"pubmed: {len(distractors) + len(targets)} abstracts "
          f"({len(targets)} query targets), {len(queries)} queries")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--patients", type=int, default=N_PATIENTS)
    parser.add_argument("--queries", type=int, default=N_QUERIES)
    args = parser.parse_args()
    if not (args.source / "synthea" / "patients.csv").is_file():
        sys.exit(f"no shared data at {args.source} (expected synthea/ and pubmed_abstracts/)")
    make_synthea(args.source / "synthea", OUT / "synthea", args.patients)
    make_pubmed(args.source / "pubmed_abstracts", OUT / "pubmed", args.queries)
    for folder in ("synthea", "pubmed"):
        size = sum(p.stat().st_size for p in (OUT / folder).glob("*.csv"))
        print(f"data/sample/{folder}: {size:,} bytes")


if __name__ == "__main__":
    main()
