"""The policy file: typed models, a loader with key-path errors, and the compiled rule set."""
