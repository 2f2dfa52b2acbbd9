"""Metrics, cost accounting, the result record, tables and plots."""
