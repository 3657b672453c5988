"""Queries over a run's recorded versions (mixed into ``flows.runstore.RunStore``): which version a stage may
reuse (``find_completed``), whether stored outputs still match their records (``verify``, ``verify_output``),
what a rerun reads (``current_inputs``), which stages are stale, and lookups by uri. Reads only: every write of
the manifest is ``RunStore``'s.
"""

from __future__ import annotations

import logging
from typing import Any

from flows.integrity import check_ref
from flows.remote import check_stored
from schemas.outputs import StageOutput, TableRef

log = logging.getLogger("turntree.runstore")


def stage_key(stage: str, iteration: int | None) -> str:
    return stage if iteration is None else f"iter-{iteration}/{stage}"


def parse_key(key: str) -> tuple[str, int | None]:
    if key.startswith("iter-"):
        it, stage = key[5:].split("/", 1)
        return stage, int(it)
    return key, None


class RunHistory:
    """Read-only queries of ``RunStore`` (needs its ``load``, ``root`` and ``run_id``)."""

    def find_completed(
        self,
        stage: str,
        iteration: int | None,
        inputs: dict[str, Any],
        params: dict[str, Any],
        *,
        code: str | None = None,
        fingerprints: dict[str, str] | None = None,
    ) -> StageOutput | None:
        """The version of this stage to reuse for these inputs, or None (run the stage).

        The current version comes first: it is reused when it was made from these inputs (same fingerprints)
        by the same code, whatever parameters a ``turntree stage --set`` gave it, so the manifest decides what
        downstream stages read. Otherwise the newest version with these inputs, parameters and code. Either way
        only when every output still has its recorded size and sha256; a version that does not is skipped with
        a warning (and the stage recomputed). ``code``/``fingerprints`` None: not compared."""
        if not self.exists():
            return None
        entry = self.load()["stages"].get(stage_key(stage, iteration), {})
        versions = entry.get("versions", {})

        def same(record: dict[str, Any], with_params: bool) -> bool:
            return (
                record["inputs"] == inputs
                and (not with_params or record["params"] == params)
                and (code is None or record.get("code") == code)
                and (fingerprints is None or record.get("fingerprints") == fingerprints)
            )

        order = sorted(versions, key=lambda v: int(v[1:]), reverse=True)
        current = entry.get("current")
        candidates = [current] if current in versions and same(versions[current], False) else []
        candidates += [v for v in order if v != current and same(versions[v], True)]
        for version in candidates:
            out = StageOutput.model_validate(versions[version]["output"])
            bad = self.verify_output(out)
            if not bad:
                return out
            log.warning("%s %s is not reused: %s", stage_key(stage, iteration), version, "; ".join(bad))
        return None

    def verify_output(self, out: StageOutput) -> list[str]:
        """``uri: why`` for each output of ``out`` whose size or sha256 differs from the record (or is gone); a
        remote checkpoint is checked as this machine will read it (``flows.remote.check_stored``)."""
        bad = []
        for ref in out.tables.values():
            why = check_stored(ref.uri, ref.sha256, ref.size)
            if why:
                bad.append(f"{ref.uri}: {why}")
        return bad

    def current_inputs(
        self, inputs: dict[str, Any], pins: dict[str, str] | None = None
    ) -> tuple[dict[str, Any], list[str]]:
        """``inputs`` with every stored table of a superseded version replaced by the same table of its stage's
        current version (what a stage rerun reads: a chain of reruns builds on each other), or of the version
        ``pins`` names for that stage (``{"iter-1/score": "v1"}``), and one line per replacement. A pin of a
        stage that is not an input, or of a version that does not exist, is a ValueError (one line)."""
        manifest, out, moved, pins = self.load(), {}, [], dict(pins or {})
        used = set()
        for name, uri in inputs.items():
            hit = self.recorded_ref(uri) if isinstance(uri, str) else None
            if hit is None:
                out[name] = uri
                continue
            key, version, _ = hit
            entry = manifest["stages"][key]
            target, why = (pins[key], "pinned") if key in pins else (entry.get("current", version), "current")
            if target not in entry["versions"]:
                have = ", ".join(sorted(entry["versions"], key=lambda v: int(v[1:])))
                raise ValueError(f"--pin {key}={target}: {key} has no version {target} (it has {have})")
            used.add(key)
            old_tables = entry["versions"][version]["output"]["tables"]
            table = next(t for t, ref in old_tables.items() if ref["uri"] == uri)
            new_tables = entry["versions"][target]["output"]["tables"]
            out[name] = new_tables[table]["uri"] if table in new_tables else uri
            if out[name] != uri:
                moved.append(f"{name}: {key} {version} -> {target} ({why})")
        if set(pins) - used:
            raise ValueError(f"--pin {', '.join(sorted(set(pins) - used))}: not an input of this stage")
        return out, moved

    def stale_stages(self) -> dict[str, str]:
        """stage key -> why, for each stage whose current version was made from a superseded version of another
        stage's output (a rerun upstream made a newer one): the pipeline's next run recomputes it from the
        current one, or ``turntree stage`` reruns it."""
        stages, stale = self.load()["stages"], {}
        for key, entry in stages.items():
            record = entry.get("versions", {}).get(entry.get("current"))
            for uri in (record or {}).get("inputs", {}).values():
                hit = self.recorded_ref(uri) if isinstance(uri, str) else None
                if hit and hit[1] != stages[hit[0]].get("current"):
                    stale[key] = f"reads {hit[0]} {hit[1]}, superseded by {stages[hit[0]]['current']}"
        return stale

    def recorded_ref(self, uri: str) -> tuple[str, str, TableRef] | None:
        """(stage key, version, recorded ref) of the committed output stored at ``uri``, if any."""
        for key, entry in self.load()["stages"].items():
            for version, record in entry.get("versions", {}).items():
                for ref in record["output"]["tables"].values():
                    if ref["uri"] == uri:
                        return key, version, TableRef.model_validate(ref)
        return None

    def repair_command(self, key: str) -> str:
        stage, iteration = parse_key(key)
        it = f" --iter {iteration}" if iteration else ""
        return f"turntree stage {stage} --run {self.run_id}{it} --root {self.root}"

    def verify(self) -> list[str]:
        """One line per output of a stage's *current* version that is missing or differs from its record, with
        the command that rewrites it (a new current version: after it, the run verifies)."""
        return [line for current, line in self._verify() if current]

    def superseded_problems(self) -> list[str]:
        """The same for superseded versions: nothing reads them any more (a rerun or a recompute replaced
        them), so they are reported, not fatal."""
        return [line for current, line in self._verify() if not current]

    def _verify(self) -> list[tuple[bool, str]]:
        found = []
        for key, entry in sorted(self.load()["stages"].items()):
            for version, record in sorted(entry.get("versions", {}).items()):
                current = version == entry.get("current")
                for ref in StageOutput.model_validate(record["output"]).tables.values():
                    why = check_ref(ref.uri, ref.sha256, ref.size)
                    if not why:
                        continue
                    if current:
                        found.append(
                            (True, f"{ref.uri}: {why} ({key} {version}; repair: {self.repair_command(key)})")
                        )
                    else:
                        found.append(
                            (
                                False,
                                f"{ref.uri}: {why} ({key} {version}, superseded by {entry.get('current')}: "
                                "not read by the run)",
                            )
                        )
        return found

    def current_output(self, stage: str, iteration: int | None) -> StageOutput | None:
        entry = self.load()["stages"].get(stage_key(stage, iteration))
        if not entry or "current" not in entry:
            return None
        return StageOutput.model_validate(entry["versions"][entry["current"]]["output"])

    def stage_record(self, stage: str, iteration: int | None, version: str | None = None) -> dict[str, Any]:
        manifest = self.load()
        key = stage_key(stage, iteration)
        entry = manifest["stages"].get(key)
        if not entry:
            have = ", ".join(sorted(manifest["stages"])) or "none"
            raise KeyError(f"run {self.run_id!r} has no stage {key!r} (it has: {have})")
        return entry["versions"][version or entry["current"]]
