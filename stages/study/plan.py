"""A study's cells (one pipeline run per grid point × method × seed) and the checks made before any runs.

    load(data, default_name, run_root) -> (study, name, cells)   the study file's dict, validated and checked
    named_methods(data, declared)       --set methods=[name, …] picking the file's own variants by name
    cells(study, name, run_root) -> [Cell]     run id <name>-<method>[-<grid point>]-s<seed>, validated params
    check(cells, study)                         StudyError (one line) unless the cells may run as a study

A cell's parameters: the study's ``base``, then its grid point, then its method's ``set``, then the algorithm
and the seed (``schemas.params.study.SEED_FIELDS``) and a fixed run id, so rerunning the study reopens the same
runs and each resumes from its last completed stage. What the cells of one grid point must share (checked, not
assumed): the model, the data parameters (so the same problems), the warm start (so its content-keyed cache
trains it once: the seed is not part of its key) and the evaluation. What their compute must match: the
completions each plans per iteration and in all (a trajectory for GRPO/GTPO; a tree node for MURPHY, counted
as if every attempt failed, the most a tree can grow), within ``compute_tolerance``. A MURPHY tree that the
node budget could cut is refused outright.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from maths.murphy import max_tree_nodes
from schemas.params import PipelineParams
from schemas.params.presets import merge
from schemas.params.study import CELL_FIELDS, NAME_PATTERN, StudyParams

SHARED = ("model", "data", "warmstart", "eval")  # identical across the cells of a grid point


class StudyError(ValueError):
    """A study file that cannot run as a study; one line."""


@dataclass(frozen=True)
class Cell:
    run_id: str
    method: str
    algorithm: str
    seed: int
    point: str  # the grid point, "key=value, …" ("" without a grid)
    params: PipelineParams

    @property
    def planned(self) -> int:
        """Completions planned per iteration (``planned_completions``)."""
        return planned_completions(self.params)


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1, "c": {"d": 2}} -> {"a": {"b": 1}, "c": {"d": 2}} (dotted keys as in ``--set``)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, last = str(key).split(".")
        node = {last: value}
        for part in reversed(parents):
            node = {part: node}
        out = merge(out, node)
    return out


def _paths(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _paths(v, key + ".") if isinstance(v, dict) and v else [key]
    return out


def _reserved(where: str, body: dict[str, Any]) -> None:
    for path in _paths(body):
        hit = next((f for f in CELL_FIELDS if path == f or path.startswith(f + ".")), None)
        if hit:
            why = "list the seeds under seeds:" if hit.endswith("seed") else "the study sets it for each cell"
            raise StudyError(f"{where} sets {hit}: {why}")


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("_") or "x"


def grid_points(grid: dict[str, list[Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """[(label, run-id fragment, overrides)], one per combination of the grid's values (keys in file order);
    [("", "", {})] without a grid."""
    if not grid:
        return [("", "", {})]
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
        frag = "-".join(f"{k.rsplit('.', 1)[-1]}{_slug(v)}" for k, v in zip(keys, values, strict=True))
        out.append((label, frag, nest(dict(zip(keys, values, strict=True)))))
    return out


def named_methods(data: dict[str, Any], declared: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each method given by name only (``--set 'methods=[grpo, gtpo-discounted]'``) that names one
    of the study file's own variants (``declared``: the file without ``--set``) replaced by that variant, so a
    subset of a file's methods can be run without restating their overrides; other names stay algorithm names."""
    variants = {m["name"]: m for m in declared.get("methods") or [] if isinstance(m, dict) and "name" in m}
    methods = data.get("methods")
    if not isinstance(methods, list):
        return data
    return {**data, "methods": [variants.get(m, m) if isinstance(m, str) else m for m in methods]}


def load(data: dict[str, Any], default_name: str, run_root: str) -> tuple[StudyParams, str, list[Cell]]:
    """The study file's contents validated (``StudyParams``), its name (``name:``, else ``default_name``: the
    file's stem) and its checked cells; every problem is one ``StudyError`` line."""
    try:
        study = StudyParams.model_validate(data)
    except ValueError as e:
        raise StudyError(_one_line(e)) from None
    name = study.name or default_name
    if not re.match(NAME_PATTERN, name):
        raise StudyError(
            f"study name {name!r} cannot prefix run ids: set name: (letters, digits, '.', '_', '-')"
        )
    found = cells(study, name, run_root)
    check(found, study)
    return study, name, found


def cells(study: StudyParams, name: str, run_root: str) -> list[Cell]:
    """Every cell of the study, grid point by grid point, then seed, then method (errors name the cell): a study
    stopped part way has every method of its first seeds, so its paired comparisons already mean something."""
    _reserved("base", study.base)
    for key in study.grid:
        _reserved("grid", nest({key: None}))
    base = merge(study.base, {})
    base.setdefault("run_root", run_root)
    out: list[Cell] = []
    for label, frag, overrides in grid_points(study.grid):
        for seed in study.seeds:
            for m in study.methods:
                own = nest(m.overrides)
                _reserved(f"method {m.name}", own)
                run_id = "-".join(x for x in (name, m.name, frag, f"s{seed}") if x)
                if len(run_id) > 128:
                    raise StudyError(
                        f"cell run id {run_id[:40]}… is over 128 characters: shorten the name or grid"
                    )
                body = merge(merge(base, overrides), own)
                body = merge(body, {"algorithm": m.algorithm, "run_id": run_id})
                body = merge(body, nest(dict.fromkeys(("rollout.seed", "update.seed"), seed)))
                try:
                    params = PipelineParams.model_validate(body)
                except ValueError as e:  # pydantic's ValidationError
                    raise StudyError(f"cell {run_id}: {_one_line(e)}") from None
                out.append(Cell(run_id, m.name, m.algorithm, seed, label, params))
    ids = [c.run_id for c in out]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup:
        raise StudyError(f"two cells get the run id {dup!r}: give the grid values distinct names")
    return out


def _one_line(e: Exception) -> str:
    if hasattr(e, "errors"):  # pydantic
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = (
                "unknown parameter"
                if err["type"] == "extra_forbidden"
                else err["msg"].removeprefix("Value error, ")
            )
            parts.append(f"{loc}: {msg}" if loc else msg)
        return "; ".join(parts)
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# --- planned compute ------------------------------------------------------------------------------------------
def tree_nodes(p: PipelineParams) -> int:
    """The most nodes one MURPHY tree of ``p`` can grow (every attempt failing)."""
    r = p.rollout
    return max_tree_nodes(r.group_size, r.child_group_size or r.group_size, r.tree_depth)


def planned_completions(p: PipelineParams) -> int:
    """Completions sampled per iteration at most: problems × G trajectories (GRPO/GTPO; each up to
    ``max_turns`` turns), or problems × the nodes of a fully grown tree (MURPHY; fewer when attempts pass)."""
    per_problem = tree_nodes(p) if p.rollout.kind == "trees" else p.rollout.group_size
    return p.rollout.problems_per_iteration * per_problem


def _first_difference(a: Any, b: Any, prefix: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}.{k}")
    return f"{prefix} ({a!r} vs {b!r})"


def check(cells: list[Cell], study: StudyParams) -> None:
    """Refuse (``StudyError``, one line) a study whose cells could not be compared fairly; see the module doc."""
    for c in cells:
        r = c.params.rollout
        if c.params.warmstart.enabled and not c.params.warmstart.cache:
            raise StudyError(
                f"cell {c.run_id}: warmstart.cache is off, so every cell would train a warm start of its own; "
                "a study shares one (leave warmstart.cache on)"
            )
        if r.kind == "trees":
            nodes = tree_nodes(c.params)
            g, g2, s = r.group_size, r.child_group_size or r.group_size, r.tree_depth
            if nodes > r.max_nodes_per_tree:
                raise StudyError(
                    f"cell {c.run_id}: a tree of G={g} roots, G'={g2} repairs per failed node and depth S={s} "
                    f"grows to {nodes} nodes, over rollout.max_nodes_per_tree={r.max_nodes_per_tree}, which "
                    f"would cut it: raise max_nodes_per_tree to {nodes} or lower G, G' or S"
                )
            if c.planned > r.max_nodes_per_batch:
                raise StudyError(
                    f"cell {c.run_id}: {r.problems_per_iteration} trees of up to {nodes} nodes exceed "
                    f"rollout.max_nodes_per_batch={r.max_nodes_per_batch}, which would cut them: raise it to "
                    f"{c.planned} or plan fewer nodes"
                )
    by_point: dict[str, list[Cell]] = {}
    for c in cells:
        by_point.setdefault(c.point, []).append(c)
    for group in by_point.values():
        first = group[0]
        ref = first.params.model_dump(mode="json", include=set(SHARED))
        for c in group[1:]:
            mine = c.params.model_dump(mode="json", include=set(SHARED))
            if mine != ref:
                field = next(f for f in SHARED if mine[f] != ref[f])
                raise StudyError(
                    f"cells {first.run_id} and {c.run_id} differ in {_first_difference(ref[field], mine[field], field)}"
                    ": the cells of a grid point share the model, problems, warm start and evaluation "
                    "(vary a parameter of these through grid:)"
                )
    if study.allow_compute_mismatch:
        return
    for what, amount in (
        ("completions per iteration", lambda c: c.planned),
        ("completions in all", lambda c: c.planned * c.params.iterations),
    ):
        lo, hi = min(cells, key=amount), max(cells, key=amount)
        if amount(hi) > amount(lo) * (1 + study.compute_tolerance):
            raise StudyError(
                f"cells plan different compute: {lo.run_id} {amount(lo)} {what}, {hi.run_id} {amount(hi)} "
                f"(+{amount(hi) / amount(lo) - 1:.0%}, over the {study.compute_tolerance:.0%} tolerance; MURPHY "
                "counts full trees): match them (rollout.group_size, problems_per_iteration, iterations) or set "
                "allow_compute_mismatch: true"
            )
