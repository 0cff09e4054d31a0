"""Plumbing shared by the DVC stages: params schema, MLflow tracking, data and tasks, the rich console."""
