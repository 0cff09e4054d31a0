"""The pre-registered comparison of reports/science/PROTOCOL.md: its runs, the resumable sweep, the analysis and the report."""
