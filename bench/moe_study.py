"""The MoE stability study (docs/moe_study.md): the same as `sapo compare`.

    .venv/bin/python bench/moe_study.py --grid default --jobs 2   # ~40-70 min on 2 free cores
    .venv/bin/python bench/moe_study.py --grid smoke              # 2 tiny runs, under a minute
    .venv/bin/python bench/moe_study.py --grid default --summary-only   # rebuild table + plots

Outputs land in runs/moe-study-GRID/ (table.md, table.csv, frontier.csv, runs.csv, plots/*.png,
runs/<config>/ with each run's metrics.jsonl). Rerunning the same command skips finished runs and
resumes interrupted ones from their last checkpoint.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sapo.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
