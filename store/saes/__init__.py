"""SAEs (and analysis results) as seen from a notebook: committed artifact folders read through handles."""
