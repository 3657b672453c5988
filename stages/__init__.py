"""The work of the pipeline, as plain Python. No module here imports prefect."""
