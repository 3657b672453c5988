"""What a stage returns: small, hashable references to what it stored (never data itself)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class TableRef(BaseModel):
    """A stored table or directory: where it is, its content hash and its row count."""

    uri: str = Field(description="Path or pyarrow filesystem URI of the stored file or directory")
    sha256: str = Field(description="sha256 of the file bytes (of a directory: of its sorted file hashes)")
    rows: int = Field(0, ge=0, description="Row count (0 for a directory such as a checkpoint)")
    size: int | None = Field(None, ge=0, description="Bytes (of a directory: of all its files); set on commit")


class StageOutput(BaseModel):
    """Return value of every ``stages.<name>.run``: references to its outputs plus scalar metrics."""

    stage: str
    tables: dict[str, TableRef] = Field(default_factory=dict, description="name -> stored table/dir")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="namespaced metrics, e.g. reward/mean"
    )
    notes: list[str] = Field(default_factory=list, description="human-readable log lines worth keeping")

    def uri(self, name: str) -> str:
        if name not in self.tables:
            raise KeyError(f"stage {self.stage!r} produced no output {name!r}; it has {sorted(self.tables)}")
        return self.tables[name].uri
