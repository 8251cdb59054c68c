"""Examples that run on real data shipped inside a package (no download): see :mod:`.digits`."""
