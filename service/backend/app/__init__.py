"""The backend application: the release gate, its metrics and its HTTP surface."""
