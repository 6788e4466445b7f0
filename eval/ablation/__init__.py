"""The ablation report (`python -m eval.ablation`): levels (levels.py), what a row measures
(measure.py), peer platforms (peers.py), the table and plot (report.py), the command (cli.py)."""
