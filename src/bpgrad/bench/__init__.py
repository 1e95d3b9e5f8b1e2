"""The comparison harness: data sources, problems, optimizer registry, runner, analysis, report."""
