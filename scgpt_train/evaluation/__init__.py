"""What every task and benchmark shares to score and report: metrics, baselines, figures, tables, files."""
