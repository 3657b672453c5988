"""The completions viewer: every trajectory (or tree node) of an iteration as one table a person reads and sorts,
logged to MLflow after the advantages stage (``completions/iter-<k>.json`` as an MLflow table, and the same rows as
``completions/iter-<k>.html``, a self-contained page whose column headers sort it).

A row per turn (GRPO / GTPO trajectories) or per node (MURPHY trees), with the problem's prompt and reference
answer, what the model wrote, the code it ran and what the run printed, the turn's reward and advantage, and the
trajectory's final reward, correctness and stop reason. The advantage of a turn is the mean over that turn's
generated tokens of the training sample's per-token advantages (the i-th run of ones in the loss mask is the i-th
turn); a trajectory no sample was made of (a tied group, dropped) has none.
"""

from __future__ import annotations

import html
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from runtime.tableio import read_table, resolve
from schemas.tables import TRAJECTORIES, TREES

TEXT_LIMIT = 4000  # characters of a text cell (prompts and outputs can be long; the stored tables hold all)


def _clip(v: Any) -> Any:
    return v[:TEXT_LIMIT] + " …" if isinstance(v, str) and len(v) > TEXT_LIMIT else v


def turn_advantages(loss_mask: list[int], advantages: list[float]) -> list[float]:
    """Mean advantage of each run of ones in ``loss_mask`` (a turn's generated tokens), in order."""
    out, total, n = [], 0.0, 0
    for m, a in zip(loss_mask, advantages, strict=True):
        if m:
            total, n = total + a, n + 1
        elif n:
            out.append(total / n)
            total, n = 0.0, 0
    if n:
        out.append(total / n)
    return out


def _problems(uri: str | None) -> dict[str, dict[str, Any]]:
    if not uri:
        return {}
    cols = ["problem_id", "prompt", "answer", "reference_solution"]
    return {r["problem_id"]: r for r in pq.read_table(uri, columns=cols).to_pylist()}


def _sample_advantages(uri: str | None) -> dict[str, list[float]]:
    if not uri:
        return {}
    rows = pq.read_table(uri, columns=["source_id", "loss_mask", "advantages"]).to_pylist()
    return {r["source_id"]: turn_advantages(r["loss_mask"], r["advantages"]) for r in rows}


def _rollout_schema(uri: str) -> pa.Schema:
    """TRAJECTORIES or TREES, whichever the table at ``uri`` holds."""
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        name = (pq.read_schema(f).metadata or {}).get(b"table", b"").decode()
    return TREES if name == "trees" else TRAJECTORIES


def completion_rows(
    rollout_uri: str, samples_uri: str | None, problems_uri: str | None
) -> list[dict[str, Any]]:
    """Every turn / node of the scored rollout at ``rollout_uri``, best final reward first."""
    problems, adv = _problems(problems_uri), _sample_advantages(samples_uri)
    rows: list[dict[str, Any]] = []
    for r in read_table(rollout_uri, _rollout_schema(rollout_uri)).to_pylist():  # in today's version
        p = problems.get(r["problem_id"], {})
        common = {
            "problem_id": r["problem_id"],
            "prompt": _clip(p.get("prompt")),
            "reference": _clip(p.get("answer") or p.get("reference_solution")),
        }
        if "turns" in r:
            per_turn = adv.get(r["trajectory_id"], [])
            for i, t in enumerate(r["turns"]):
                rows.append(
                    {
                        "trajectory_id": r["trajectory_id"],
                        **common,
                        "sample": r["sample_idx"],
                        "turn": t["turn_idx"],
                        "text": _clip(t.get("text")),
                        "code": _clip(t.get("code")),
                        "exec_status": t.get("exec_status"),
                        "output": _clip(t.get("exec_output")),
                        "turn_reward": t.get("turn_reward"),
                        "advantage": per_turn[i] if i < len(per_turn) else None,
                        "reward": r.get("reward"),
                        "correct": r.get("correct"),
                        "stop_reason": r.get("stop_reason"),
                        "final_answer": _clip(r.get("final_answer")),
                        "no_verdict": r.get("no_verdict"),
                        "policy_version": r.get("policy_version"),
                    }
                )
        else:
            for n in r["nodes"]:
                node_adv = adv.get(f"{r['tree_id']}/{n['node_id']}", [])
                rows.append(
                    {
                        "tree_id": r["tree_id"],
                        **common,
                        "node": n["node_id"],
                        "parent": n["parent_id"],
                        "depth": n["depth"],
                        "text": _clip(n.get("text")),
                        "code": _clip(n.get("code")),
                        "output": _clip(n.get("exec_result")),
                        "tests": f"{n.get('tests_passed')}/{n.get('tests_total')}",
                        "reward": n.get("reward"),
                        "return": n.get("ret"),
                        "advantage": sum(node_adv) / len(node_adv) if node_adv else None,
                        "pruned": n.get("pruned"),
                        "no_verdict": n.get("no_verdict"),
                        "policy_version": r.get("policy_version"),
                    }
                )
    key = "trajectory_id" if rows and "trajectory_id" in rows[0] else "tree_id"
    order = "turn" if key == "trajectory_id" else "node"
    rows.sort(key=lambda x: (-(x["reward"] if x["reward"] is not None else float("-inf")), x[key], x[order]))
    return rows


_SORT_JS = """
document.querySelectorAll('th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
  const asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
  const val = r => { const t = r.cells[col].innerText; const n = parseFloat(t);
                     return t !== '' && !isNaN(n) && isFinite(t) ? n : t; };
  rows.sort((a, b) => { const x = val(a), y = val(b);
    const c = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === 'number' ? -1 : 1);
    return asc ? c : -c; });
  rows.forEach(r => body.appendChild(r));
}));
"""


def completions_html(rows: list[dict[str, Any]], title: str) -> str:
    """A self-contained page: the rows as a table; click a column header to sort by it (again: reverse)."""
    cols = list(rows[0]) if rows else []

    def cell(v: Any) -> str:
        if v is None:
            return "<td></td>"
        if isinstance(v, float):
            return f"<td>{v:.4g}</td>"
        text = html.escape(v if isinstance(v, str) else json.dumps(v))
        return f"<td><pre>{text}</pre></td>" if isinstance(v, str) and "\n" in v else f"<td>{text}</td>"

    head = "".join(f"<th title='click to sort'>{html.escape(c)}</th>" for c in cols)
    body = "\n".join("<tr>" + "".join(cell(r[c]) for c in cols) + "</tr>" for r in rows)
    style = (
        "body{font:13px sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px;"
        "vertical-align:top;max-width:40em}th{cursor:pointer;background:#eee;position:sticky;top:0}"
        "pre{white-space:pre-wrap;margin:0}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h3>{html.escape(title)}</h3><p>{len(rows)} rows; click a column "
        f"header to sort.</p><table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"
        f"<script>{_SORT_JS}</script></body></html>"
    )
