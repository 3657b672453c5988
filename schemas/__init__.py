"""Arrow table schemas and pydantic parameter models. Light imports only (pyarrow, pydantic)."""
