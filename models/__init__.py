"""Named model presets: the *.toml files beside this one (data, not code)."""
