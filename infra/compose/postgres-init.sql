-- PostgreSQL holds two databases: prefect (POSTGRES_DB) and mlflow (created here on first start).
CREATE DATABASE mlflow;
