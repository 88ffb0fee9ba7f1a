"""Framework-free helpers shared by integration tests and the demo."""
