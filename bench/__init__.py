"""ehin-bench harness: paper tables as sweeps of cells, a results store, runners and renderers."""
