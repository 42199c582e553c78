"""The release-gate backend built on the gatemetrics engine."""
