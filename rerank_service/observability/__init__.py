"""Logs, metrics, request ids and trace context: what every layer may use to report."""
