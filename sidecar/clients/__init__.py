"""Clients of the services the restarters drive (Docker Engine, Kubernetes), with one retry
policy between them."""
