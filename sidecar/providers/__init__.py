"""Provider-side concerns: the keys the sidecar holds for each provider."""
