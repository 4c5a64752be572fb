"""The registry part: a Docker Registry HTTP API v2 / OCI Distribution pull-through cache."""
