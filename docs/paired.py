"""Paired bootstrap 95% CI of held-out accuracy between two evaluations on the same problems (docs/results.md).

    python docs/paired.py RUN_ROOT RUN_A:ITER RUN_B:ITER      e.g. python docs/paired.py runs r-gtpo:0 r-gtpo:3
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.runstore import RunStore
from maths.eval_metrics import paired_bootstrap_diff, problem_scores, sample_records
from runtime.tableio import read_table
from schemas.tables import EVAL_RESULTS


def scores(root, run, it):
    uri = RunStore(root, run).current_output("evaluate", it).uri("eval_results")
    return problem_scores(sample_records(read_table(uri, EVAL_RESULTS)))

root = sys.argv[1]
pairs = [a.split(":") for a in sys.argv[2:]]  # run:iter run:iter
(ra, ia), (rb, ib) = pairs
r = paired_bootstrap_diff(scores(root, ra, int(ia)), scores(root, rb, int(ib)), resamples=10000, seed=0)
print(json.dumps({k: round(v, 4) for k, v in r.items()}))
