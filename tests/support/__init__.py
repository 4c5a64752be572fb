"""Test support: real upstream registries, a token server and OCI test images."""
